"""`llmup serve` picks the worker: llmup's session slots by default for GGUF, llama-cpp-python's
server with --llamacpp-impl server; the calibration record is kept for both."""

from __future__ import annotations

import time

import httpx
import pytest
from conftest import MACHINES
from support.ggufgen import write_llama_gguf
from support.serving import Served

from launcher.backends.launch import backend_spec
from launcher.calibration.records import compare, lookup
from launcher.hardware.snapshot import load_snapshot
from launcher.netaddr import free_port
from launcher.planning.plan import Plan
from launcher.planning.planner import PlanRequest, make_plan
from launcher.runkey import KEY_ENV
from launcher.workers.llamacpp_slots.server import build_parser

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    return write_llama_gguf(folder / "tiny-chat.gguf", tensor_type="F32", chat_template=TEMPLATE)


@pytest.mark.parametrize(
    ("impl", "module"),
    [
        ("slots", "launcher.workers.llamacpp_slots.server"),
        ("server", "launcher.workers.llamacpp_python.server"),
    ],
)
def test_serve_runs_the_chosen_worker(tiny_model, tmp_path, impl, module):
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


def test_the_slot_workers_flags_are_the_plans(tiny_model, tmp_path, monkeypatch):
    """The launch value, parsed by the worker's own parser (without loading anything)."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    hardware = load_snapshot(MACHINES / "a6000x2-busy.json")
    plan = make_plan(PlanRequest(hardware=hardware, model="llama-2-70b-chat", kv_cache="q8_0"))
    assert len(plan.placement.devices) == 2 and plan.parallel >= 1
    spec = backend_spec(plan, tiny_model, home=tmp_path, session_ttl_s=3600, port=12345)
    assert spec.command[1:3] == ["-m", "launcher.workers.llamacpp_slots.server"]
    args = build_parser().parse_args(spec.command[3:])
    assert (args.context, args.parallel) == (plan.context, plan.parallel)
    assert args.tensor_split == tuple(plan.placement.tensor_split)
    assert args.n_gpu_layers == plan.placement.n_gpu_layers
    assert (args.kv_type, args.flash_attn) == ("q8_0", "on")
    assert args.slots_dir == tmp_path / "slots" and args.slot_ttl_s == 3600
    assert args.slot_ram_mib == plan.settings.slot_ram_mib
    assert (args.host, args.port) == ("127.0.0.1", 12345)
    assert spec.env["CUDA_VISIBLE_DEVICES"] == "0,1" and spec.launch_env()[KEY_ENV]
    request = PlanRequest(hardware=hardware, model="llama-2-70b-chat", llamacpp_impl="server")
    stock = backend_spec(make_plan(request), tiny_model, home=tmp_path)
    assert "launcher.workers.llamacpp_python.server" in stock.command


def _wait(condition, deadline_s: float = 120.0) -> None:
    deadline = time.monotonic() + deadline_s
    while not condition():
        assert time.monotonic() < deadline, "the condition never came true"
        time.sleep(0.2)


def _slots_total(server: Served) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith('llmup_slots{state="total"}'):
            return float(line.split()[-1])
    return 0.0


def test_every_start_grows_its_kv_cache_after_serving_and_the_first_records_it(
    tiny_model, tmp_path
):
    """Every start of a CPU plan starts the worker on one sequence and grows it to the
    planned ones behind the first requests; the first start records the planned load (the
    grown context's buffers, not the one-sequence start's) once it grew, a later one keeps
    that record."""
    args = ["--model-file", str(tiny_model), "--context", "512", "--parallel", "3"]
    commands, records = [], []
    for _ in range(2):
        server = Served(args, tmp_path, free_port())
        try:
            server.wait_ready()
            commands.append(server.backend().cmdline())
            plan = Plan.model_validate(httpx.get(server.url + "/v1/plan").json()["plan"])
            chat = {"model": plan.model.id, "messages": [{"role": "user", "content": "hi"}]}
            reply = httpx.post(server.url + "/v1/chat/completions", json={**chat, "max_tokens": 2})
            assert reply.status_code == 200, reply.text
            _wait(lambda s=server: _slots_total(s) == 3)
            _wait(lambda p=plan: lookup(tmp_path, p) is not None)
            records.append(lookup(tmp_path, plan))
        finally:
            server.stop()
    assert all(c[c.index("--initial-parallel") + 1] == "1" for c in commands)
    figures = compare(records[0])
    assert records[0].measured["kv"] and all(f.within_tolerance for f in figures), figures
    assert records[1] == records[0]  # recorded once: a later start does not measure again


def test_a_stateless_history_resent_by_its_key_reuses_that_keys_cache(tiny_model, tmp_path):
    """What agent clients do (the whole history each request, no session): the same key's
    next request reads only the new tokens; another key's identical request reads them all,
    on chat and completions alike."""
    args = ["--model-file", str(tiny_model), "--context", "512", "--parallel", "2",
            "--api-key", "key-a", "--api-key", "key-b"]  # fmt: skip
    server = Served(args, tmp_path, free_port())
    try:
        server.wait_ready()

        def cached(key: str, route: str, body: dict) -> int:
            headers = {"Authorization": f"Bearer {key}"}
            reply = httpx.post(server.url + route, json={"model": "tiny-chat", **body},
                               headers=headers)  # fmt: skip
            assert reply.status_code == 200, reply.text
            return (reply.json()["usage"].get("prompt_tokens_details") or {}).get(
                "cached_tokens", 0
            )

        chat = {"messages": [{"role": "user", "content": "hello world the a an"}],
                "max_tokens": 3, "temperature": 0}  # fmt: skip
        assert cached("key-a", "/v1/chat/completions", chat) == 0
        chat["messages"] += [{"role": "assistant", "content": "hi"},
                             {"role": "user", "content": "and then"}]  # fmt: skip
        assert cached("key-b", "/v1/chat/completions", chat) == 0
        assert cached("key-a", "/v1/chat/completions", chat) > 0
        text = {"prompt": "one two three four five six seven", "max_tokens": 2}
        assert cached("key-a", "/v1/completions", text) == 0
        assert cached("key-a", "/v1/completions", text) > 0
        assert cached("key-b", "/v1/completions", text) == 0
    finally:
        server.stop()
