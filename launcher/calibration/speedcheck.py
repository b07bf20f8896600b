"""After a serve starts: measure the backend's decode and prompt speed and keep it beside the
plan's prediction in the calibration record (what `llmup plan` shows next time).

Two short requests to the backend itself: one completion of a ~60-token prompt with
max_tokens=1 times the prompt, one streamed completion times the gaps between tokens. It is
skipped when the plan predicts it would take longer than BUDGET_S. `check_speed_when_idle`
runs it on a thread once the proxy serves, when no request has come for IDLE_S, and throws a
measurement away (to try again later) when a request came while it ran: the first start
opens without waiting for it, and a client's request never shares the backend with it
unnoticed.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel

from launcher.calibration.records import lookup, save_record

log = logging.getLogger(__name__)

BUDGET_S = 20.0
IDLE_S = 1.0  # the proxy's quiet time before the check runs
IDLE_TRIES = 3  # measurements a request overlapped, thrown away, before giving up
Activity = Callable[[], tuple[int, int]]  # (requests admitted so far, requests in flight)
DECODE_TOKENS = 16
PROMPT = (
    "Llamas are domesticated South American camelids, kept as pack animals and for their "
    "wool since the time of the Inca. They are social animals and live in herds; their wool "
    "is soft and contains only a small amount of lanolin. Write one sentence about llamas."
)
PROMPT_TOKENS_GUESS = 60


class TooFewTokens(ValueError):
    """The model ended its reply (or streamed only empty pieces) before it could be timed."""


class MeasuredSpeed(BaseModel):
    decode_tokens_per_s: float
    prompt_tokens_per_s: float
    prompt_tokens: int
    decode_tokens: int


def needs_check(served: Any, home: Path) -> bool:
    """A llama.cpp plan whose speed this machine has not measured (or found unmeasurable)
    for this prediction, within BUDGET_S."""
    plan = served.plan
    if plan is None or plan.backend != "llama.cpp" or plan.speed is None:
        return False
    predicted = _predicted_seconds(plan.speed)
    if predicted is None or predicted > BUDGET_S:
        log.info("speed check skipped: predicted to take %s s", predicted)
        return False
    if measured_before(lookup(home, plan), plan.speed):
        log.info("speed check skipped: measured on an earlier start of this plan")
        return False
    return True


def check_speed_when_idle(
    served: Any,
    home: Path,
    *,
    notify: Callable[[str], None],
    activity: Activity,
    stop: threading.Event,
    idle_s: float = IDLE_S,
    after: threading.Event | None = None,
) -> threading.Thread | None:
    """`check_speed` on a thread, run while the proxy is idle (see the module docstring),
    once `after` is set (the load recorded: a KV cache growing after the start is not
    measured half-grown); None when there is nothing to check."""
    if not needs_check(served, home):
        return None

    def run() -> None:
        while after is not None and not after.wait(0.25):
            if stop.is_set():
                return
        for _ in range(IDLE_TRIES):
            if not _wait_idle(activity, stop, idle_s):
                return
            before = activity()[0]
            outcome = _measure(served)
            if stop.is_set():
                return
            if activity()[0] == before:
                _record(served, home, outcome, notify)
                return
            log.info("speed check overlapped a request: measuring again when idle")

    thread = threading.Thread(target=run, name="llmup-speed-check", daemon=True)
    thread.start()
    return thread


def _wait_idle(activity: Activity, stop: threading.Event, idle_s: float) -> bool:
    """Block until no request was admitted for `idle_s` and none is in flight; False when
    stopping."""
    seen = activity()
    quiet_since = time.monotonic()
    while not stop.wait(min(idle_s / 4, 0.25)):
        now = activity()
        if now != seen or now[1]:
            seen, quiet_since = now, time.monotonic()
        elif time.monotonic() - quiet_since >= idle_s:
            return True
    return False


def check_speed(served: Any, home: Path, *, notify: Callable[[str], None]) -> None:
    """Measure a freshly started llama.cpp backend and record it; never fails the serve.

    Once per plan: a start whose record already holds a measurement of the same prediction
    (or found this model cannot be timed so: it streams too few tokens) does not measure
    again (see `needs_check`)."""
    if needs_check(served, home):
        _record(served, home, _measure(served), notify)


def _measure(served: Any) -> MeasuredSpeed | Exception:
    """The measurement, or the exception that stopped it."""
    plan = served.plan
    try:
        return measure_speed(
            served.base_url, plan.model.id, headers=getattr(served, "auth_headers", None)
        )
    except (TooFewTokens, httpx.HTTPError, ValueError, KeyError) as exc:
        return exc


def _record(
    served: Any, home: Path, measured: MeasuredSpeed | Exception, notify: Callable[[str], None]
) -> None:
    """The outcome in the plan's record: figures, or a model that cannot be timed so (the
    next start would see the same); a failed request is only logged."""
    plan = served.plan
    if isinstance(measured, Exception):
        log.warning("could not measure the backend's speed: %s", measured)
        if isinstance(measured, TooFewTokens):
            _keep(home, plan, {"unmeasurable": str(measured)})
        return
    notify(speed_line(plan.speed, measured))
    _keep(
        home,
        plan,
        {
            "measured_decode": round(measured.decode_tokens_per_s, 2),
            "measured_prompt": round(measured.prompt_tokens_per_s, 2),
        },
    )


def _keep(home: Path, plan: Any, outcome: dict[str, float | str]) -> None:
    """The check's outcome in the plan's calibration record, beside the prediction."""
    record = lookup(home, plan)
    if record is not None:
        predicted = {
            "predicted_decode": plan.speed.decode_tokens_per_s,
            "predicted_prompt": plan.speed.prompt_tokens_per_s,
        }
        record.speed = {**predicted, **outcome}
        save_record(home, record)


def measured_before(record: Any, predicted: Any) -> bool:
    """The record holds a measured speed (or found it unmeasurable) for this prediction."""
    speed = record.speed if record is not None else {}
    return bool(speed.get("measured_decode") or speed.get("unmeasurable")) and (
        speed.get("predicted_decode"),
        speed.get("predicted_prompt"),
    ) == (predicted.decode_tokens_per_s, predicted.prompt_tokens_per_s)


def _predicted_seconds(speed) -> float | None:
    if not speed.decode_tokens_per_s or not speed.prompt_tokens_per_s:
        return None
    prompt = PROMPT_TOKENS_GUESS / speed.prompt_tokens_per_s
    return 2 * prompt + (DECODE_TOKENS + 1) / speed.decode_tokens_per_s


def measure_speed(
    base_url: str, model: str, *, timeout: float = 60.0, headers: dict[str, str] | None = None
) -> MeasuredSpeed:
    """`headers` carry the backend's per-run key."""
    # plain HTTP on loopback: no certificate store to load
    with httpx.Client(base_url=base_url, timeout=timeout, headers=headers, verify=False) as client:
        body = {"model": model, "prompt": PROMPT, "max_tokens": 1, "temperature": 0}
        start = time.perf_counter()
        reply = client.post("/v1/completions", json=body)
        prompt_s = time.perf_counter() - start
        reply.raise_for_status()
        prompt_tokens = int(reply.json()["usage"]["prompt_tokens"])
        stamps = _token_times(client, {**body, "max_tokens": DECODE_TOKENS + 1, "stream": True})
    if len(stamps) < 3:
        raise TooFewTokens(f"the backend streamed {len(stamps)} tokens, too few to time")
    return MeasuredSpeed(
        decode_tokens_per_s=(len(stamps) - 1) / (stamps[-1] - stamps[0]),
        prompt_tokens_per_s=prompt_tokens / prompt_s,
        prompt_tokens=prompt_tokens,
        decode_tokens=len(stamps) - 1,
    )


def _token_times(client: httpx.Client, body: dict) -> list[float]:
    """The arrival time of every streamed token (chunks before the finish)."""
    stamps = []
    with client.stream("POST", "/v1/completions", json=body) as reply:
        reply.raise_for_status()
        for line in reply.iter_lines():
            if not line.startswith("data: {"):
                continue
            choices = json.loads(line[6:]).get("choices") or [{}]
            if choices[0].get("finish_reason") is None:
                stamps.append(time.perf_counter())
    return stamps


def speed_line(predicted, measured: MeasuredSpeed) -> str:
    return (
        f"measured speed: {measured.decode_tokens_per_s:.3g} tokens/s decode (predicted "
        f"{predicted.decode_tokens_per_s:g}), {measured.prompt_tokens_per_s:.3g} tokens/s prompt "
        f"(predicted {predicted.prompt_tokens_per_s:g}; {measured.prompt_tokens}-token prompt)"
    )
