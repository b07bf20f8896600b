"""`llmup serve` picks the worker: llmup's session slots by default for GGUF, llama-cpp-python's
server with --llamacpp-impl server; the calibration record is kept for both."""

from __future__ import annotations

import httpx
import pytest
from test_serve import Served, tiny_model  # noqa: F401 - the module's model fixture

from launcher.backends.calibration import lookup
from launcher.backends.spec import free_port
from launcher.planning.plan import Plan


@pytest.mark.parametrize(
    ("impl", "module"),
    [
        ("slots", "launcher.backends.llamacpp_server"),
        ("server", "launcher.backends.llamacpp_worker"),
    ],
)
def test_serve_runs_the_chosen_worker(tiny_model, tmp_path, impl, module):  # noqa: F811
    args = ["--model-file", str(tiny_model), "--context", "512", "--llamacpp-impl", impl]
    if impl == "slots":
        args += ["--parallel", "2"]
    server = Served(args, tmp_path, free_port())
    try:
        server.wait_ready()
        assert module in " ".join(server.backend().cmdline())
        plan = Plan.model_validate(httpx.get(server.url + "/v1/plan").json()["plan"])
        assert plan.settings.llamacpp_impl == impl
        assert plan.parallel == (2 if impl == "slots" else 1)
        chat = {
            "model": plan.model.id,
            "messages": [{"role": "user", "content": "hello world"}],
            "max_tokens": 4,
            "temperature": 0,
        }
        sid = {"X-Session-Id": "served"}
        for _ in range(2):
            reply = httpx.post(server.url + "/v1/chat/completions", json=chat, headers=sid)
            assert reply.status_code == 200, reply.text
            chat["messages"] += [
                {"role": "assistant", "content": reply.json()["choices"][0]["message"]["content"]},
                {"role": "user", "content": "the a an"},
            ]
        details = reply.json()["usage"].get("prompt_tokens_details") or {}
        assert (details.get("cached_tokens", 0) > 0) == (impl == "slots")
        metrics = httpx.get(server.url + "/metrics").text
        assert ('llmup_slots{state="total"} 2.0' in metrics) == (impl == "slots")
        record = lookup(tmp_path, plan)
        assert record is not None and record.measured["kv"]
    finally:
        server.stop()
