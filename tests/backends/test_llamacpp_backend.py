"""The llama.cpp backend: llama_cpp.server on a generated tiny GGUF, supervised, over HTTP."""

from __future__ import annotations

import argparse
import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from conftest import MACHINES
from support.ggufgen import write_llama_gguf

from launcher.backends.launch import backend_spec
from launcher.backends.launch.llamacpp_python import SERVER_ENV_NAMES, ready_timeout_s
from launcher.backends.supervise.supervisor import State, Supervisor
from launcher.calibration import records as calibration
from launcher.calibration.llamacpp_log import parse_load_log
from launcher.engines import GGML_TYPES, physical_cores
from launcher.errors import BackendLoadError, ModelFileError, UsageError
from launcher.hardware.snapshot import load_snapshot
from launcher.planning.plan import Plan
from launcher.planning.planner import PlanRequest, make_plan

TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}<|assistant|>"


def home() -> Path:
    return Path(os.environ["LLMUP_HOME"])


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return write_llama_gguf(tmp_path / "tiny.gguf", n_layer=2)


def cpu_plan(model: Path, **kw) -> Plan:
    hardware = load_snapshot(MACHINES / "cpu-16gb.json")
    request = PlanRequest(
        hardware=hardware, model_file=model, context=512, llamacpp_impl="server", **kw
    )
    return make_plan(request)


def server_parser() -> argparse.ArgumentParser:
    """llama_cpp.server's own argument parser, as its __main__ builds it."""
    from llama_cpp.server.cli import add_args_from_model
    from llama_cpp.server.settings import Settings

    parser = argparse.ArgumentParser()
    add_args_from_model(parser, Settings)
    return parser


def post(sup: Supervisor, path: str, body: dict) -> dict:
    """A direct call to the backend, with its per-run key (as the proxy sends it)."""
    response = httpx.post(
        sup.base_url + path, json=body, headers=sup.auth_headers, timeout=60, trust_env=False
    )
    response.raise_for_status()
    return response.json()


# ----- the launch value, checked against the installed server's parser


def test_flags_are_the_plans_and_the_server_accepts_them(tiny):
    plan = cpu_plan(tiny)
    spec = backend_spec(plan, tiny, home=home(), port=12345)
    assert spec.command[1:3] == ["-m", "launcher.workers.llamacpp_python.server"]
    args = server_parser().parse_args(spec.command[3:])
    assert args.model == str(tiny) and args.model_alias == plan.model.id == spec.model_alias
    assert (args.host, args.port) == ("127.0.0.1", 12345)
    assert (args.n_ctx, args.n_batch, args.n_ubatch) == (512, 512, 512)
    assert args.n_gpu_layers == 0 and args.tensor_split is None
    assert args.type_k == args.type_v == 1 and args.flash_attn is True  # auto: on without GPUs
    assert args.n_threads == args.n_threads_batch == physical_cores()
    assert args.cache is False and args.logits_all is False and args.use_mlock is False
    assert args.interrupt_requests is False and args.verbose is True
    assert args.chat_format == "llama-2"  # no template in the file: llama-2, said explicitly
    assert spec.health_path == "/health" and spec.base_url == "http://127.0.0.1:12345"
    assert spec.api_key and spec.api_key not in " ".join(spec.command)  # env only, never argv
    assert spec.log_path.parent == home() / "logs"
    assert spec.env["CUDA_VISIBLE_DEVICES"] == ""  # a CPU plan allocates nothing on a GPU
    assert spec.ready_timeout_s == pytest.approx(30 + 10 * tiny.stat().st_size / 1e9)


def test_threads_configured_and_chat_format_override(tiny):
    spec = backend_spec(cpu_plan(tiny), tiny, home=home(), threads=7, chat_format="chatml")
    args = server_parser().parse_args(spec.command[3:])
    assert args.n_threads == args.n_threads_batch == 7 and args.chat_format == "chatml"


def test_two_gpu_plan_splits_tensors_over_exactly_its_devices(tiny, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    hardware = load_snapshot(MACHINES / "a6000x2-busy.json")
    plan = make_plan(
        PlanRequest(
            hardware=hardware, model="llama-2-70b-chat", kv_cache="q8_0", llamacpp_impl="server"
        )
    )
    assert len(plan.placement.devices) == 2 and plan.settings.flash_attn
    spec = backend_spec(plan, tiny, home=home(), port=12345)
    args = server_parser().parse_args(spec.command[3:])
    assert args.tensor_split == plan.placement.tensor_split
    assert args.n_gpu_layers == plan.placement.n_gpu_layers
    assert args.type_k == args.type_v == 8 and args.flash_attn is True
    assert spec.env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert spec.env["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert spec.devices == ("cuda:0", "cuda:1")


def test_ggml_type_ids_are_llama_cpps():
    import llama_cpp

    for name, value in GGML_TYPES.items():
        constant = getattr(llama_cpp, f"GGML_TYPE_{name.upper()}", None)
        assert constant in (None, value), name  # bf16 is not exported by 0.3.36
    assert GGML_TYPES["f16"] == llama_cpp.GGML_TYPE_F16


def test_no_server_setting_leaks_in_from_the_environment(tiny, monkeypatch):
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    fields = {*ModelSettings.model_fields, *ServerSettings.model_fields}
    assert {f.upper() for f in fields} <= SERVER_ENV_NAMES
    monkeypatch.setenv("PORT", "9999")
    monkeypatch.setenv("api_key", "x")
    spec = backend_spec(cpu_plan(tiny), tiny, home=home())
    env = spec.child_env()
    assert "PORT" not in env and "api_key" not in env and env["PYTHONUNBUFFERED"] == "1"


def test_bad_inputs(tiny, tmp_path):
    with pytest.raises(ModelFileError):
        backend_spec(cpu_plan(tiny), tmp_path / "absent.gguf", home=home())
    plan = cpu_plan(tiny).model_copy(update={"backend": "vllm"})
    with pytest.raises(UsageError):
        backend_spec(plan, tiny, home=home())
    assert ready_timeout_s(40e9) == pytest.approx(430)


# ----- the real server


def test_serves_the_alias_chat_and_completions_and_records_calibration(tiny):
    plan = cpu_plan(tiny)
    spec = backend_spec(plan, tiny, home=home())
    started = time.monotonic()
    with Supervisor(spec) as sup:
        load_s = time.monotonic() - started
        models = httpx.get(
            sup.base_url + "/v1/models", headers=sup.auth_headers, trust_env=False
        ).json()
        assert [m["id"] for m in models["data"]] == [plan.model.id]
        chat = post(
            sup,
            "/v1/chat/completions",
            {"model": plan.model.id, "messages": [{"role": "user", "content": "hello"}],
             "max_tokens": 8, "temperature": 0},
        )  # fmt: skip
        assert chat["choices"][0]["message"]["role"] == "assistant"
        assert chat["usage"]["completion_tokens"] > 0
        text = post(sup, "/v1/completions", {"prompt": "the", "max_tokens": 8})
        assert text["choices"][0]["text"] and text["usage"]["completion_tokens"] > 0
        record = calibration.record_load(home(), plan, sup.attempt_log())
    assert load_s < 20
    assert record is not None
    for kind in ("model", "kv", "compute"):
        assert record.measured_totals[kind] > 0
    assert record.load["n_ctx"] == 512 and record.load["flash_attn"] is True
    assert record.load["type_k"] == "f16"
    assert all(f.within_tolerance for f in calibration.compare(record))
    found = calibration.lookup(home(), plan)
    assert found == record
    assert calibration.lookup(home(), cpu_plan(tiny, kv_cache="q8_0")) is None


def test_kv_cache_type_and_flash_attention_reach_llama_cpp(tmp_path):
    # a q8_0 KV cache needs a head size that is a multiple of its 32-element blocks
    model = write_llama_gguf(tmp_path / "wide.gguf", n_layer=2, n_embd=128, n_ff=256)
    plan = cpu_plan(model, kv_cache="q8_0")
    assert plan.settings.flash_attn is True
    with Supervisor(backend_spec(plan, model, home=home())) as sup:
        buffers = parse_load_log(sup.attempt_log())
    assert (buffers.type_k, buffers.type_v) == ("q8_0", "q8_0")
    assert buffers.flash_attn is True and buffers.n_ctx == 512


def test_a_quantized_model_answers(tmp_path):
    """Plain llama_cpp.server segfaults here on AMX CPUs (weight repacking); the worker not."""
    model = write_llama_gguf(
        tmp_path / "q8.gguf", n_layer=2, n_embd=128, n_ff=256, tensor_type="Q8_0"
    )
    with Supervisor(backend_spec(cpu_plan(model), model, home=home()), max_restarts=0) as sup:
        text = post(sup, "/v1/completions", {"prompt": "hello", "max_tokens": 4})
        assert text["choices"][0]["text"] and sup.restarts == 0


def test_the_gguf_chat_template_is_used_when_present(tmp_path):
    model = write_llama_gguf(tmp_path / "templated.gguf", n_layer=2, chat_template=TEMPLATE)
    plan = cpu_plan(model)
    spec = backend_spec(plan, model, home=home())
    assert "--chat_format" not in spec.command
    with Supervisor(spec) as sup:
        chat = post(
            sup,
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        )
        log_text = sup.attempt_log()
    assert chat["choices"][0]["message"]["role"] == "assistant"
    assert "Using gguf chat template" in log_text or "Guessed chat format" in log_text
    assert "Using fallback chat format" not in log_text


@pytest.mark.parametrize("template", [TEMPLATE, None])
def test_a_planned_file_is_read_once(tmp_path, monkeypatch, template):
    """The plan of a local GGUF says whether it has a chat template (its header was read at
    planning), so the launch reads the file no second time; a plan without that knowledge
    (a download) still reads it."""
    from launcher.backends.launch import llamacpp_python as llamacpp

    model = write_llama_gguf(tmp_path / "m.gguf", n_layer=2, chat_template=template)
    plan = cpu_plan(model)
    assert plan.model.gguf_chat_template is (template is not None)

    def no_second_read(path):
        raise AssertionError("the header was read again at launch")

    monkeypatch.setattr(llamacpp, "open_gguf", no_second_read)
    spec = backend_spec(plan, model, home=home())
    assert ("--chat_format" in spec.command) is (template is None)
    unknown = plan.model_copy(
        update={"model": plan.model.model_copy(update={"gguf_chat_template": None})}
    )
    with pytest.raises(AssertionError, match="read again"):
        backend_spec(unknown, model, home=home())


def test_killed_backend_is_restarted_and_serves_again(tiny):
    plan = cpu_plan(tiny)
    spec = backend_spec(plan, tiny, home=home())
    with Supervisor(spec, backoff_initial=0.2) as sup:
        old = sup.pid
        os.kill(old, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while sup.state is State.READY and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sup.wait_ready(60)
        assert sup.restarts == 1 and sup.pid not in (None, old)
        text = post(sup, "/v1/completions", {"prompt": "hello", "max_tokens": 4})
        assert text["choices"][0]["text"]


def test_settings_llama_cpp_refuses_name_its_reason(tiny):
    plan = cpu_plan(tiny, kv_cache="q8_0")  # head size 16 cannot hold q8_0 blocks
    with pytest.raises(BackendLoadError) as err:
        Supervisor(backend_spec(plan, tiny, home=home())).start()
    assert err.value.kind == "unknown"
    assert "does not divide" in err.value.line and "llama_context" in err.value.line


@pytest.mark.parametrize("damage", ["truncated", "random"])
def test_corrupt_model_is_classified(tiny, tmp_path, damage):
    bad = tmp_path / f"{damage}.gguf"
    data = tiny.read_bytes()
    bad.write_bytes(data[: len(data) // 2] if damage == "truncated" else os.urandom(100_000))
    spec = backend_spec(cpu_plan(tiny), bad, home=home())
    sup = Supervisor(spec)
    with pytest.raises(BackendLoadError) as err:
        sup.start()
    assert err.value.kind == "corrupt_model"
    assert str(spec.log_path) in str(err.value)
    assert sup.state is State.FAILED and sup.pid is None
