"""After a serve starts: measure the backend's decode and prompt speed and keep it beside the
plan's prediction in the calibration record (what `llmup plan` shows next time).

Two short requests to the backend itself, before the proxy opens: one completion of a
~60-token prompt with max_tokens=1 times the prompt, one streamed completion times the gaps
between tokens. It is skipped when the plan predicts it would take longer than BUDGET_S.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel

from launcher.calibration.records import lookup, save_record

log = logging.getLogger(__name__)

BUDGET_S = 20.0
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


def check_speed(served: Any, home: Path, *, notify: Callable[[str], None]) -> None:
    """Measure a freshly started llama.cpp backend and record it; never fails the serve.

    Once per plan: a start whose record already holds a measurement of the same prediction
    (or found this model cannot be timed so: it streams too few tokens) opens the proxy
    without measuring again (the check delays every start otherwise)."""
    plan = served.plan
    if plan.backend != "llama.cpp" or plan.speed is None:
        return
    predicted = _predicted_seconds(plan.speed)
    if predicted is None or predicted > BUDGET_S:
        log.info("speed check skipped: predicted to take %s s", predicted)
        return
    if measured_before(lookup(home, plan), plan.speed):
        log.info("speed check skipped: measured on an earlier start of this plan")
        return
    try:
        measured = measure_speed(
            served.base_url, plan.model.id, headers=getattr(served, "auth_headers", None)
        )
    except TooFewTokens as exc:  # the model's own replies: the next start would see the same
        log.warning("could not measure the backend's speed: %s", exc)
        _keep(home, plan, {"unmeasurable": str(exc)})
        return
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        log.warning("could not measure the backend's speed: %s", exc)
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
    with httpx.Client(base_url=base_url, timeout=timeout, headers=headers) as client:
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
