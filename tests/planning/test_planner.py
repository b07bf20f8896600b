"""The planner on recorded machines: policy, budgets, nothing-fits and bad input."""

from __future__ import annotations

import json

import pytest
from conftest import MACHINES, run_cli

from launcher.errors import NothingFitsError, UsageError
from launcher.hardware.snapshot import load_snapshot
from launcher.planning.planner import PlanRequest, make_plan

# machine -> (model, quant, backend, offload class)
EXPECTED = {
    "cpu-16gb": ("llama-2-13b-chat", "Q5_K_M", "llama.cpp", "cpu"),
    "cpu-64gb": ("llama-2-70b-chat", "Q6_K", "llama.cpp", "cpu"),
    "apple-m2-16gb": ("llama-2-7b-chat", "Q6_K", "llama.cpp", "full"),
    "apple-m2max-64gb": ("llama-2-70b-chat", "Q4_K_S", "llama.cpp", "full"),
    "rtx3060-12gb": ("llama-2-13b-chat", "Q3_K_L", "llama.cpp", "full"),
    "rtx4090-24gb": ("llama-2-13b-chat", "Q8_0", "llama.cpp", "full"),
    "a6000-48gb": ("llama-2-70b-chat", "Q4_K_M", "llama.cpp", "full"),
    "a6000x2-busy": ("llama-2-70b-chat", "Q6_K", "llama.cpp", "full"),
    "a100-80gb": ("llama-2-70b-chat", "Q8_0", "llama.cpp", "full"),
}


def plan_for(machine: str, **kw):
    return make_plan(PlanRequest(hardware=load_snapshot(MACHINES / f"{machine}.json"), **kw))


@pytest.mark.parametrize("machine", sorted(EXPECTED))
def test_recorded_machine_plans(machine):
    plan = plan_for(machine)
    assert (plan.model.id, plan.quant, plan.backend, plan.placement.offload) == EXPECTED[machine]
    for dev in plan.placement.devices:
        assert dev.need_mib <= dev.budget_mib
    assert plan.placement.ram_need_mib <= plan.placement.ram_budget_mib
    assert plan.context == 4096
    m = plan.memory_mib
    assert m.total == pytest.approx(m.weights + m.kv_cache + m.compute + m.overhead, abs=4)


@pytest.mark.parametrize("machine", sorted(EXPECTED))
def test_choice_is_maximal(machine):
    """Every larger model or higher-precision quant of the chosen size was rejected for memory."""
    plan = plan_for(machine)
    bigger = [r for r in plan.rejected if not r.reason.startswith("fits")]
    fitting = [r for r in plan.rejected if r.reason.startswith("fits")]
    assert all(r.miss_mib > 0 for r in bigger)
    assert all("needs" in r.reason or "exllamav2" in r.reason or "GPTQ" in r.reason for r in bigger)
    assert all(f.model != plan.model.id or f.quant != plan.quant for f in fitting)


def test_a6000_picks_70b_4bit_as_the_write_up_reports():
    plan = plan_for("a6000-48gb")
    assert plan.model.id == "llama-2-70b-chat" and 4 <= plan.bits_per_weight < 5
    dev = plan.placement.devices[0]
    assert dev.device == "cuda:0" and dev.budget_mib == 48335 - 1024
    assert plan.placement.n_gpu_layers == 81  # every block and the output layer
    q5 = next(r for r in plan.rejected if r.quant == "Q5_0")
    assert "on cuda:0" in q5.reason and "free after reserve" in q5.reason


def test_memory_in_use_by_other_processes_is_respected():
    """GPU 1 of the busy pair has 34485 MiB in use: it gets far fewer layers than GPU 0."""
    plan = plan_for("a6000x2-busy")
    d0, d1 = plan.placement.devices
    assert d1.budget_mib < 14000 < d0.budget_mib
    assert d0.layers > 3 * d1.layers and d0.layers + d1.layers == 80
    assert plan.placement.tensor_split == [float(d0.layers), float(d1.layers + 1)]


def test_idle_pair_of_a6000_holds_70b_q8():
    hw = load_snapshot(MACHINES / "a6000x2-busy.json")
    for g in hw.gpus:
        g.memory_free_mib = g.memory_total_mib - 600
    plan = make_plan(PlanRequest(hardware=hw))
    assert (plan.model.id, plan.quant) == ("llama-2-70b-chat", "Q8_0")


def test_gptq_with_exllamav2_when_pinned():
    plan = plan_for("a6000-48gb", backend="exllamav2")
    assert plan.backend == "exllamav2" and plan.format == "gptq"
    assert plan.model.id == "llama-2-70b-chat"
    assert plan.source.repo_id == "TheBloke/Llama-2-70B-Chat-GPTQ"
    assert plan.source.revision == "gptq-4bit-32g-actorder_True"
    assert plan.settings.cache_mode == "FP16"
    assert 35 * 1024 < plan.placement.devices[0].need_mib < 42 * 1024


def test_exllamav2_on_a_machine_without_nvidia_is_nothing_fits():
    with pytest.raises(NothingFitsError) as exc:
        plan_for("apple-m2-16gb", backend="exllamav2")
    assert all("NVIDIA" in r.reason for r in exc.value.closest)


def test_pinned_model_and_offload():
    plan = plan_for("rtx3060-12gb", model="70b", allow_offload=True)
    assert plan.model.id == "llama-2-70b-chat" and plan.placement.offload == "partial"
    assert 0 < plan.placement.n_gpu_layers < 80
    assert plan.placement.ram_need_mib > 20000


def test_without_offload_a_too_large_pin_is_nothing_fits():
    with pytest.raises(NothingFitsError) as exc:
        plan_for("rtx3060-12gb", model="70b")
    closest = exc.value.closest
    assert closest and closest[0].quant == "Q2_K"  # the smallest misses least
    assert [c.miss_mib for c in closest] == sorted(c.miss_mib for c in closest)


def test_longer_context_never_cut():
    plan = plan_for("rtx4090-24gb", context=16384)
    assert plan.context == 16384
    assert plan.memory_mib.kv_cache >= 16384 * 0.78125 * 0.5  # at least a q4 cache
    smaller = plan_for("rtx4090-24gb", context=16384, kv_cache="q8_0")
    assert smaller.settings.flash_attn and smaller.memory_mib.kv_cache < plan.memory_mib.kv_cache


def test_split_files_plan_a_join():
    plan = plan_for("a100-80gb")
    assert plan.source.join is not None
    assert plan.source.join.output == "llama-2-70b-chat.Q8_0.gguf"
    assert plan.source.files == plan.source.join.parts


def test_fallbacks_are_the_next_candidates():
    plan = plan_for("a6000-48gb")
    assert plan.fallbacks
    assert all(f.memory_mib.total < plan.memory_mib.total for f in plan.fallbacks)
    assert plan.fallbacks[0].model.id == plan.model.id  # a smaller quant of the same model


@pytest.mark.parametrize(
    "kw", [{"context": 0}, {"context": -5}, {"kv_cache": "q3"}, {"reserve_mib": -1}]
)
def test_bad_requests(kw):
    with pytest.raises(UsageError):
        plan_for("a6000-48gb", **kw)


# --- the CLI, as a user runs it -------------------------------------------------------


def test_cli_plan_json_contract():
    res = run_cli("plan", "--hardware", str(MACHINES / "a6000-48gb.json"), "--json")
    assert res.returncode == 0, res.stderr
    plan = json.loads(res.stdout)
    for key in (
        "model",
        "backend",
        "format",
        "quant",
        "bits_per_weight",
        "source",
        "context",
        "placement",
        "memory_mib",
        "rejected",
    ):
        assert key in plan
    assert set(plan["memory_mib"]) >= {"weights", "kv_cache", "compute", "overhead", "total"}
    assert {"device", "need_mib", "budget_mib"} <= set(plan["placement"]["devices"][0])
    assert all("reason" in r for r in plan["rejected"])


def test_cli_nothing_fits_exit_code_3():
    res = run_cli("plan", "--hardware", str(MACHINES / "rtx3060-12gb.json"), "--model", "70b")
    assert res.returncode == 3
    assert "Q2_K" in res.stdout and "Traceback" not in res.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["--model", "llama-9"],
        ["--context", "-1"],
        ["--context", "0"],
        ["--kv-cache", "q3"],
    ],
)
def test_cli_bad_input_exit_2(args):
    res = run_cli("plan", "--hardware", str(MACHINES / "a6000-48gb.json"), *args)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr and res.stderr.strip().count("\n") == 0


def test_cli_bad_snapshot_files(tmp_path):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"gpus": [{"index": 0}], "system": {}}))
    for path in (bad_json, wrong, tmp_path / "missing.json"):
        res = run_cli("plan", "--hardware", str(path))
        assert res.returncode == 2 and "Traceback" not in res.stderr
        assert str(path) in res.stderr


def test_cli_bad_model_file(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    for path in (junk, tmp_path / "missing.gguf"):
        res = run_cli(
            "plan", "--hardware", str(MACHINES / "a6000-48gb.json"), "--model-file", str(path)
        )
        assert res.returncode == 2 and "Traceback" not in res.stderr


def test_cli_detect_json_round_trips(tmp_path):
    res = run_cli("detect", "--json")
    assert res.returncode == 0
    snap = tmp_path / "me.json"
    snap.write_text(res.stdout)
    hw = load_snapshot(snap)
    assert hw.system.cpu_cores >= 1 and hw.system.ram_total_mib > 0
    planned = run_cli("plan", "--hardware", str(snap), "--json")
    assert planned.returncode in (0, 3)


def test_env_settings_apply_below_flags():
    env = {"LLMUP_PLANNING__CONTEXT": "8192"}
    res = run_cli("plan", "--hardware", str(MACHINES / "a100-80gb.json"), "--json", env=env)
    assert json.loads(res.stdout)["context"] == 8192
    res = run_cli(
        "plan",
        "--hardware",
        str(MACHINES / "a100-80gb.json"),
        "--json",
        "--context",
        "2048",
        env=env,
    )
    assert json.loads(res.stdout)["context"] == 2048


def test_cli_estimate_json():
    res = run_cli("estimate", "--json")
    data = json.loads(res.stdout)
    seven = data["models"][0]
    assert seven["inference_gb"] == {"fp32": 28.0, "fp16": 14.0, "int8": 7.0, "int4": 3.5}
    assert seven["optimizer_state_gb"]["adamw"] == 56.0
