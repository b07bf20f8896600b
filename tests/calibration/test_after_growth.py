"""A worker that started on one sequence logs two contexts; its record is of the model and
the planned (last) context only, as one load of the plan would log."""

from __future__ import annotations

from conftest import DATA

from launcher.calibration.after_growth import CONTEXT_START, planned_load
from launcher.calibration.llamacpp_log import parse_load_log

LOAD_LOG = DATA / "llamacpp-logs" / "cpu-f16-ctx512-no-repack.log"


def test_the_record_of_a_grown_worker_is_the_planned_load():
    one_load = LOAD_LOG.read_text()
    at = one_load.index(CONTEXT_START)
    model, context = one_load[:at], one_load[at:]
    first = f"{CONTEXT_START}\nllama_kv_cache:        CPU KV buffer size =     1.00 MiB\n"
    grown = model + first + context + "INFO engine: KV cache grown to 8 sequences\n"
    assert parse_load_log(grown) != parse_load_log(one_load)  # both contexts' buffers summed
    assert parse_load_log(planned_load(grown)) == parse_load_log(one_load)
    assert planned_load(one_load) == one_load  # one context: as it is
