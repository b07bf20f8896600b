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
from launcher.calibration.speedcheck import check_speed
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


@pytest.fixture
def silent_backend():
    """An OpenAI-compatible completions server whose model ends every reply at once (what a
    random-weight model does): usage on the plain reply, only the finish chunk when streamed.
    Counts the requests it gets."""
    app, calls = FastAPI(), []

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        calls.append(body)
        reply = {"choices": [{"index": 0, "text": "", "finish_reason": "stop"}]}
        if not body.get("stream"):
            return {**reply, "usage": {"prompt_tokens": 60, "completion_tokens": 0}}
        chunks = [f"data: {json.dumps(reply)}\n\n", "data: [DONE]\n\n"]
        return StreamingResponse(iter(chunks), media_type="text/event-stream")

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
