"""The load's buffers of a worker that started small: recorded once its KV cache grew.

A slot worker started with `--initial-parallel 1` serves on one sequence and builds the
planned context behind its first requests (`workers.llamacpp_slots.engine.grow_later`), so
its log holds two context constructions: the first start's one-sequence context, then the
planned one. The record compares the plan with the model's buffers and the planned context
only (`planned_load`), once the worker logged that it grew (one that gave up is not
recorded: what it runs on is not the plan's load). The first start of a plan thus
loads as quickly as every later one, instead of zeroing the whole planned KV cache before it
answers.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from launcher.calibration.records import record_load
from launcher.planning.plan import Plan
from launcher.protocol import KV_GROWN_LINE, KV_NOT_GROWN_LINES

log = logging.getLogger(__name__)

CONTEXT_START = "llama_context: constructing llama_context"
POLL_S = 0.2
WAIT_S = 600.0  # a KV cache that takes longer to grow is not recorded this start


def planned_load(text: str) -> str:
    """The log of the model's load and of its last context: what one load of the plan logs."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if CONTEXT_START in line]
    if len(starts) < 2:
        return text
    return "\n".join(lines[: starts[0]] + lines[starts[-1] :])


def record_when_grown(
    plan: Plan, attempt_log: Callable[[], str], home: Path, stop: threading.Event
) -> threading.Event:
    """Record the plan's load on a thread once the worker's KV cache grew; the event is set
    when that is done (or abandoned: it could not grow, stopping, or WAIT_S passed)."""
    done = threading.Event()

    def run() -> None:
        try:
            deadline = time.monotonic() + WAIT_S
            while not stop.wait(POLL_S) and time.monotonic() < deadline:
                text = attempt_log()
                if KV_GROWN_LINE in text:
                    record(plan, planned_load(text), home)
                    return
                if any(line in text for line in KV_NOT_GROWN_LINES):
                    break  # what it runs on is not the plan's load: measured another start
            log.info("the KV cache did not reach the plan's; its load is recorded another start")
        finally:
            done.set()

    threading.Thread(target=run, name="llmup-calibration", daemon=True).start()
    return done


def record(plan: Plan, load_log: str, home: Path) -> None:
    """Predicted vs measured buffers, kept for `llmup plan` to show next time."""
    try:
        record_load(home, plan, load_log)  # it says so when the log holds no sizes
    except OSError as exc:  # a calibration record is never worth failing a serve
        log.warning("could not record the load's buffer sizes: %s", exc)
