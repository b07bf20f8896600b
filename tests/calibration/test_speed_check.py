"""The speed check after a serve runs once per plan: a later start of the same plan, whose
calibration record holds a measurement of the same prediction, opens without measuring again
(it would delay every start); a changed prediction is measured; a model that streams too few
tokens to time is recorded as such and not tried again on every start."""

from __future__ import annotations

import json
import logging
import threading
import time
from types import SimpleNamespace

import pytest
import uvicorn
from conftest import DATA, MACHINES
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from support.ggufgen import write_llama_gguf

from launcher.calibration.records import lookup, record_load, save_record
from launcher.calibration.speedcheck import check_speed, check_speed_when_idle
from launcher.hardware.snapshot import load_snapshot
from launcher.netaddr import free_port
from launcher.planning import PlanRequest, make_plan

LOAD_LOG = DATA / "llamacpp-logs" / "cpu-f16-ctx512-no-repack.log"


@pytest.fixture
def plan(tmp_path):
    path = write_llama_gguf(tmp_path / "m.gguf", n_layer=2, n_embd=64)
    hw = load_snapshot(MACHINES / "cpu-2core-24gb.json")
    plan = make_plan(PlanRequest(hardware=hw, model_file=path, context=512))
    assert plan.speed is not None and plan.speed.decode_tokens_per_s
    return plan


def _measured(home, plan, *, predicted_decode: float) -> None:
    """A start that measured: its load record, then the speed check's figures."""
    record = record_load(home, plan, LOAD_LOG.read_text())
    record.speed = {
        "predicted_decode": predicted_decode,
        "predicted_prompt": plan.speed.prompt_tokens_per_s,
        "measured_decode": 50.0,
        "measured_prompt": 200.0,
    }
    save_record(home, record)


def _check(plan, home, caplog, base_url: str = "http://127.0.0.1:9") -> list[str]:
    notes: list[str] = []
    served = SimpleNamespace(plan=plan, base_url=base_url)  # by default nothing listens there
    with caplog.at_level(logging.INFO, logger="launcher.calibration.speedcheck"):
        check_speed(served, home, notify=notes.append)
    return notes


def test_a_plan_measured_on_an_earlier_start_is_not_measured_again(plan, tmp_path, caplog):
    _measured(tmp_path, plan, predicted_decode=plan.speed.decode_tokens_per_s)
    record_load(tmp_path, plan, LOAD_LOG.read_text())  # the next start records its load...
    assert lookup(tmp_path, plan).speed["measured_decode"] == 50.0  # ...keeping the speed
    assert _check(plan, tmp_path, caplog) == []
    assert "measured on an earlier start" in caplog.text
    assert "could not measure" not in caplog.text


def test_a_changed_prediction_is_measured_again(plan, tmp_path, caplog):
    _measured(tmp_path, plan, predicted_decode=plan.speed.decode_tokens_per_s * 2)
    assert _check(plan, tmp_path, caplog) == []
    assert "could not measure the backend's speed" in caplog.text  # it tried: nothing there


def completions_server(tokens: int, on_request=lambda: None):
    """An OpenAI-compatible completions server streaming `tokens` text chunks before its
    finish chunk (0: a model that ends every reply at once, as random weights do), usage on
    the plain reply. Counts the requests it gets; `on_request` runs on each."""
    app, calls = FastAPI(), []

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        calls.append(body)
        on_request()
        reply = {"choices": [{"index": 0, "text": "", "finish_reason": "stop"}]}
        if not body.get("stream"):
            return {**reply, "usage": {"prompt_tokens": 60, "completion_tokens": 0}}
        text = {"choices": [{"index": 0, "text": "a", "finish_reason": None}]}
        chunks = [f"data: {json.dumps(text)}\n\n"] * tokens
        chunks += [f"data: {json.dumps(reply)}\n\n", "data: [DONE]\n\n"]
        return StreamingResponse(iter(chunks), media_type="text/event-stream")

    return app, calls


@pytest.fixture
def silent_backend():
    """A backend whose model ends every reply at once."""
    app, calls = completions_server(0)
    yield from serving(app, calls)


def serving(app, calls):
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}", calls
    server.should_exit = True
    thread.join(timeout=10)


def test_a_model_too_quiet_to_time_is_recorded_and_not_tried_again(
    plan, tmp_path, caplog, silent_backend
):
    url, calls = silent_backend
    record_load(tmp_path, plan, LOAD_LOG.read_text())
    assert _check(plan, tmp_path, caplog, url) == [] and len(calls) == 2
    speed = lookup(tmp_path, plan).speed
    assert "too few to time" in speed["unmeasurable"] and "measured_decode" not in speed
    assert speed["predicted_decode"] == plan.speed.decode_tokens_per_s
    record_load(tmp_path, plan, LOAD_LOG.read_text())  # the next start of the same plan
    caplog.clear()
    assert _check(plan, tmp_path, caplog, url) == [] and len(calls) == 2  # nothing sent
    assert "measured on an earlier start" in caplog.text


class Requests:
    """What the proxy's admission reports to the idle-time check: (admitted so far, now)."""

    def __init__(self) -> None:
        self.total = 0

    def activity(self) -> tuple[int, int]:
        return self.total, 0


def _when_idle(plan, home, url, requests, stop, notes):
    served = SimpleNamespace(plan=plan, base_url=url)
    return check_speed_when_idle(
        served, home, notify=notes.append, activity=requests.activity, stop=stop, idle_s=0.05
    )


def test_the_check_runs_once_the_proxy_is_idle_and_records_the_speed(plan, tmp_path):
    app, calls = completions_server(8)
    requests, stop, notes = Requests(), threading.Event(), []
    record_load(tmp_path, plan, LOAD_LOG.read_text())
    for url, _ in serving(app, calls):
        thread = _when_idle(plan, tmp_path, url, requests, stop, notes)
        thread.join(30)
    assert len(calls) == 2 and len(notes) == 1 and notes[0].startswith("measured speed:")
    assert lookup(tmp_path, plan).speed["measured_decode"] > 0


def test_a_busy_proxy_is_never_measured_and_a_stop_ends_the_wait(plan, tmp_path):
    app, calls = completions_server(8)
    busy, stop, notes = Requests(), threading.Event(), []
    busy.activity = lambda: (time.monotonic_ns(), 1)  # always a request in flight
    record_load(tmp_path, plan, LOAD_LOG.read_text())
    for url, _ in serving(app, calls):
        thread = _when_idle(plan, tmp_path, url, busy, stop, notes)
        time.sleep(0.5)
        assert calls == [] and thread.is_alive()
        stop.set()
        thread.join(5)
    assert (
        not thread.is_alive()
        and notes == []
        and "measured_decode" not in (lookup(tmp_path, plan).speed)
    )


def test_a_measurement_a_request_overlapped_is_thrown_away_and_taken_again(plan, tmp_path):
    requests, stop, notes = Requests(), threading.Event(), []

    def client_arrives() -> None:  # the first measurement shares the backend with a client
        if requests.total == 0:
            requests.total = 1

    app, calls = completions_server(8, on_request=client_arrives)
    record_load(tmp_path, plan, LOAD_LOG.read_text())
    for url, _ in serving(app, calls):
        _when_idle(plan, tmp_path, url, requests, stop, notes).join(30)
    assert len(calls) == 4 and len(notes) == 1  # measured twice, recorded once
    assert lookup(tmp_path, plan).speed["measured_decode"] > 0
