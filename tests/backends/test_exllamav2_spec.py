"""The exllamav2 launch for a GPTQ plan: the worker's own parser accepts exactly the plan."""

from __future__ import annotations

import json

import pytest
from conftest import MACHINES

from launcher.backends.launch import backend_spec
from launcher.errors import ModelFileError, UsageError
from launcher.hardware.snapshot import load_snapshot
from launcher.planning.planner import PlanRequest, make_plan
from launcher.workers.exllamav2.server import build_parser


def gptq_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 1024)
    return tmp_path


def plan_for(machine: str, **kw):
    hw = load_snapshot(MACHINES / f"{machine}.json")
    return make_plan(PlanRequest(hardware=hw, backend="exllamav2", **kw))


def test_single_gpu_plan(tmp_path):
    plan = plan_for("a6000-48gb", kv_cache="q8_0")
    spec = backend_spec(plan, gptq_folder(tmp_path), home=tmp_path)
    args = build_parser().parse_args(spec.command[3:])
    assert spec.command[1:3] == ["-m", "launcher.workers.exllamav2.server"]
    assert spec.health_path == "/health" and spec.auth_headers["Authorization"].startswith(
        "Bearer "
    )
    assert args.max_seq_len == 4096 and args.cache_mode == "Q8"
    assert args.model_alias == "llama-2-70b-chat" and args.gpu_split is None
    assert args.host == "127.0.0.1" and args.port == spec.port
    assert spec.env["CUDA_VISIBLE_DEVICES"] == "0"


def test_multi_gpu_plan_passes_the_split(tmp_path):
    plan = plan_for("rtx3090-3060-a4000")  # 24, 12 and 16 GB: 70B needs all three
    assert [d.layers for d in plan.placement.devices] == [39, 17, 24]
    spec = backend_spec(plan, gptq_folder(tmp_path), home=tmp_path)
    args = build_parser().parse_args(spec.command[3:])
    assert args.gpu_split == pytest.approx(plan.placement.tensor_split)
    assert all(g > 0 for g in args.gpu_split)


def test_refuses_what_it_cannot_serve(tmp_path):
    with pytest.raises(ModelFileError):
        backend_spec(plan_for("a6000-48gb"), tmp_path, home=tmp_path)
    gguf_plan = make_plan(PlanRequest(hardware=load_snapshot(MACHINES / "a6000-48gb.json")))
    with pytest.raises(ModelFileError):  # a GGUF plan needs a GGUF file, not a folder
        backend_spec(gguf_plan, gptq_folder(tmp_path), home=tmp_path)
    with pytest.raises(UsageError):
        backend_spec(gguf_plan.model_copy(update={"backend": "vllm"}), tmp_path, home=tmp_path)
