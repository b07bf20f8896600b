"""The sized out-of-memory fallback, on llama.cpp's out-of-memory log lines."""

from __future__ import annotations

import pytest
from conftest import DATA, MACHINES

from launcher.calibration.oom_fallback import (
    MARGIN_MIB,
    choose_fallback,
    last_attempt,
    parse_shortfall,
)
from launcher.hardware.snapshot import load_snapshot
from launcher.planning import PlanRequest, make_plan

LOGS = DATA / "llamacpp-oom"
KV_LOG = (LOGS / "cuda-oom-kv.log").read_text()


@pytest.fixture(scope="module")
def one_a6000():
    """70B Q4_K_M on one A6000: 41702 MiB planned on cuda:0 (one sequence, as logged)."""
    return make_plan(PlanRequest(hardware=load_snapshot(MACHINES / "a6000-48gb.json"), parallel=1))


@pytest.fixture(scope="module")
def busy_pair():
    """70B Q6_K over the busy pair: 64 layers on cuda:0, 16 on cuda:1 (one sequence)."""
    hardware = load_snapshot(MACHINES / "a6000x2-busy.json")
    return make_plan(PlanRequest(hardware=hardware, parallel=1))


def never_cached(source) -> bool:
    return False


def test_weights_of_the_second_gpu_did_not_fit(busy_pair):
    s = parse_shortfall((LOGS / "cuda-oom-weights.log").read_text(), busy_pair)
    assert (s.buffer, s.device) == ("CUDA1", "cuda:1")
    assert (s.asked_mib, s.allocated_mib, s.free_mib) == (10916.76, 0.0, 10400.0)
    assert s.short_mib == pytest.approx(516.76)


def test_kv_cache_after_the_weights_did_not_fit(one_a6000):
    s = parse_shortfall(KV_LOG, one_a6000)
    assert (s.buffer, s.device, s.asked_mib) == ("CUDA0", "cuda:0", 1280.0)
    assert s.allocated_mib == pytest.approx(39361.27)  # the model buffer already on CUDA0
    assert s.short_mib == pytest.approx(329.27)


def test_the_fallback_needs_the_shortfall_less_and_says_the_arithmetic(one_a6000):
    choice = choose_fallback(one_a6000, one_a6000, KV_LOG, tried=[one_a6000], cached=never_cached)
    assert (choice.plan.model.id, choice.plan.quant) == ("llama-2-70b-chat", "Q4_K_S")
    need = choice.plan.placement.devices[0].need_mib
    assert 41702 - need >= 329.27 + MARGIN_MIB
    for figure in ("1280 MiB", "39361 MiB already allocated", "40312 MiB free", "329 MiB short"):
        assert figure in choice.notice
    assert f"needs {need} MiB there instead of 41702" in choice.notice


def test_a_cached_fallback_of_the_same_model_is_preferred(one_a6000):
    def q4_0_cached(source) -> bool:
        return any("Q4_0" in f for f in source.files)

    choice = choose_fallback(one_a6000, one_a6000, KV_LOG, tried=[one_a6000], cached=q4_0_cached)
    assert choice.plan.quant == "Q4_0" and "already downloaded" in choice.notice


def test_a_large_shortfall_skips_the_quants_that_save_too_little(one_a6000):
    """The old fallback took Q4_K_S (5% less) whatever was missing; 5.6 GiB short needs Q3."""
    log = KV_LOG.replace("- 40312 MiB free", "- 35000 MiB free")
    choice = choose_fallback(one_a6000, one_a6000, log, tried=[one_a6000], cached=never_cached)
    assert choice.plan.quant == "Q3_K_M"
    assert "5641 MiB short" in choice.notice


def test_nothing_saves_enough(one_a6000):
    log = KV_LOG.replace("- 40312 MiB free", "- 1000 MiB free")
    choice = choose_fallback(one_a6000, one_a6000, log, tried=[one_a6000], cached=never_cached)
    assert choice.plan is None and "no fallback needs" in choice.notice


def test_without_sizes_the_next_smaller_candidate_is_taken(one_a6000):
    log = "Killed\n"
    choice = choose_fallback(one_a6000, one_a6000, log, tried=[one_a6000], cached=never_cached)
    assert choice.plan.quant == one_a6000.fallbacks[0].quant
    assert "gave no sizes" in choice.notice


def test_the_last_attempt_of_a_supervisor_log(tmp_path):
    log = tmp_path / "backend.log"
    log.write_text(
        "\n==== llmup: x attempt 1\n==== cmd 'allocating 1 MiB'\nold\n"
        "\n==== llmup: x attempt 2 at now\n==== cmd 'allocating 2 MiB'\nnew line\n"
    )
    assert last_attempt(log) == "new line\n"
    assert last_attempt(tmp_path / "missing.log") == ""
