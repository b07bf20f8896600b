"""Plans on recorded machines a user brings: the chosen model, quant and physical devices,
and the environment the backend is launched with."""

from __future__ import annotations

import pytest
from conftest import MACHINES, run_cli
from support.recorded_machines import recorded

from launcher.backends.launch import backend_env
from launcher.catalog.loader import load_catalog
from launcher.catalog.shape import ModelShape, layout_from_catalog
from launcher.hardware.installed import detect_backends
from launcher.hardware.snapshot import load_snapshot
from launcher.planning import PlanRequest, make_plan
from launcher.planning.backend_access import ASSUMED
from launcher.planning.memory_llamacpp import (
    LlamaCppSettings,
    compute_bytes,
    pipeline_copies_bytes,
)
from launcher.units import MIB, ceil_mib


def plan_on(machine: str, **kw):
    return make_plan(PlanRequest(hardware=load_snapshot(MACHINES / f"{machine}.json"), **kw))


def chosen(plan) -> tuple:
    devices = [d.device for d in plan.placement.devices]
    return plan.model.id, plan.quant, plan.placement.offload, devices


def test_busy_second_card_is_left_out_and_charged_nothing():
    """Two A6000, the second held by another job (600 MiB free): 70B on the first alone."""
    plan = plan_on("a6000x2-second-full")
    assert chosen(plan) == ("llama-2-70b-chat", "Q4_K_M", "full", ["cuda:0"])
    (left,) = plan.placement.left_out
    assert left.device == "cuda:1"
    assert "600 MiB free" in left.reason and "1024 MiB reserve" in left.reason
    assert backend_env(plan)["CUDA_VISIBLE_DEVICES"] == "0"
    too_big = next(r for r in plan.rejected if r.quant == "Q5_0" and r.backend == "llama.cpp")
    assert "cuda:1 left out" in too_big.reason and "on cuda:0" in too_big.reason


def test_busy_second_card_with_offload_allowed_still_uses_the_first_gpu():
    plan = plan_on("a6000x2-second-full", allow_offload=True)
    assert chosen(plan) == ("llama-2-70b-chat", "Q4_K_M", "full", ["cuda:0"])


def test_a_full_card_is_never_counted_in_a_miss():
    """The old message 'needs 5.8 GiB on cuda:0+cuda:1, 46.2 GiB free' came from charging
    the full card; now a miss names the card that was tried and the one left out."""
    plan = plan_on("a6000x2-second-full")
    misses = [r for r in plan.rejected if not r.reason.startswith("fits")]
    assert misses and not any("cuda:0+cuda:1" in r.reason for r in misses)
    assert all(r.miss_mib > 0 for r in misses)


def test_the_only_usable_gpu_is_index_1():
    """A display card at index 0, an RTX 4090 at index 1: the plan and the launch name 1."""
    plan = plan_on("gt1030-rtx4090")
    assert chosen(plan) == ("llama-2-13b-chat", "Q8_0", "full", ["cuda:1"])
    assert plan.placement.devices[0].name == "NVIDIA GeForce RTX 4090"
    assert backend_env(plan) | {"PYTHONUNBUFFERED": "1"} == {
        "PYTHONUNBUFFERED": "1",
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "CUDA_VISIBLE_DEVICES": "1",
    }
    assert [lo.device for lo in plan.placement.left_out] == ["cuda:0"]
    # the only visible GPU is CUDA0 to llama.cpp: the buffers it will log
    assert set(plan.llamacpp_buffers_mib["model"]) == {"CUDA0", "CPU"}


def test_cuda_visible_devices_set_when_detecting():
    """CUDA_VISIBLE_DEVICES=1 on the busy pair: the plan fits GPU 1 and launches it alone,
    never a two-GPU split into a child that sees one card."""
    snap = recorded("a6000x2-busy", environ={"CUDA_VISIBLE_DEVICES": "1"})
    plan = make_plan(PlanRequest(hardware=snap))
    assert chosen(plan) == ("llama-2-13b-chat", "Q5_K_M", "full", ["cuda:1"])
    assert plan.placement.devices[0].budget_mib == 13854 - 1024
    assert backend_env(plan)["CUDA_VISIBLE_DEVICES"] == "1"


def test_visible_order_is_the_launch_order():
    snap = recorded("rtx3090-3060-a4000", environ={"CUDA_VISIBLE_DEVICES": "2,0"})
    plan = make_plan(PlanRequest(hardware=snap, model="llama-2-70b-chat"))
    assert [d.device for d in plan.placement.devices] == ["cuda:2", "cuda:0"]
    assert backend_env(plan)["CUDA_VISIBLE_DEVICES"] == "2,0"


def test_cpu_only_llama_cpp_with_a_detected_gpu_plans_the_cpu_and_says_how_to_fix_it():
    """The llama-cpp-python installed here cannot offload: an A6000 beside it is not used."""
    snap = load_snapshot(MACHINES / "a6000-48gb.json")
    snap = snap.model_copy(update={"backends": detect_backends()})
    plan = make_plan(PlanRequest(hardware=snap))
    assert chosen(plan) == ("llama-2-70b-chat", "Q8_0", "cpu", [])
    hint = next(n for n in plan.notes if "CPU build" in n)
    assert "\n" not in hint
    assert (
        'CMAKE_ARGS="-DGGML_CUDA=on" pip install --force-reinstall --no-cache-dir llama-cpp-python'
        in hint
    )
    assert hint.endswith("`docker build -f docker/Dockerfile.cuda -t llmup:cuda .`)")
    assert any("GPTQ candidates skipped" in n for n in plan.notes)  # exllamav2 not installed
    assert backend_env(plan)["CUDA_VISIBLE_DEVICES"] == ""


def test_a_plan_for_another_machine_assumes_the_gpu_builds_and_says_so():
    plan = plan_on("a6000-48gb")
    assert chosen(plan) == ("llama-2-70b-chat", "Q4_K_M", "full", ["cuda:0"])
    assert plan.notes[0] == ASSUMED
    assert [n.split(" is chosen over")[0] for n in plan.notes[1:]] == [
        "llama-2-70b-chat Q4_K_M on llama.cpp (4.80 bits/weight, ~11.2 tokens/s)"
    ]  # and why not its GPTQ (tests/planning/test_gptq_note.py)


def test_three_gpus_of_different_sizes_share_70b_with_pipeline_copies():
    plan = plan_on("rtx3090-3060-a4000", parallel=1)  # one sequence's KV: the figures below
    assert chosen(plan) == ("llama-2-70b-chat", "Q4_K_M", "full", ["cuda:0", "cuda:1", "cuda:2"])
    layers = [d.layers for d in plan.placement.devices]
    assert layers == [38, 18, 24] and sum(layers) == 80
    assert plan.placement.tensor_split == [38.0, 18.0, 25.0]  # the output layer on the last
    assert backend_env(plan)["CUDA_VISIBLE_DEVICES"] == "0,1,2"
    spec = load_catalog().get("llama-2-70b-chat")
    variant = next(v for v in spec.gguf.variants if v.quant == "Q4_K_M")
    shape = ModelShape(
        spec.architecture,
        layout_from_catalog(spec.architecture, variant, load_catalog().quant("Q4_K_M")),
    )
    settings = LlamaCppSettings(n_ctx=4096)
    copies = pipeline_copies_bytes(shape, settings)
    assert copies == 3 * (4096 * 512 * 4 + 512 * 8192 * 4)  # 3 more copies of mask + input
    for d in plan.placement.devices:
        assert d.breakdown_mib["compute"] == ceil_mib(compute_bytes(shape, settings) + copies)


def test_one_gpu_has_no_pipeline_copies():
    plan = plan_on("a6000-48gb")
    (dev,) = plan.placement.devices
    assert dev.breakdown_mib["compute"] < 620  # 605 MiB, no copies


@pytest.mark.parametrize("machine", ["a6000x2-busy", "rtx3090-3060-a4000", "gt1030-rtx4090"])
def test_every_planned_gpu_gets_layers_and_fits(machine):
    plan = plan_on(machine)
    for d in plan.placement.devices:
        assert d.layers > 0 and d.need_mib <= d.budget_mib
    used = {d.device for d in plan.placement.devices}
    assert not used & {lo.device for lo in plan.placement.left_out}
    assert plan.placement.ram_need_mib * MIB <= plan.placement.ram_budget_mib * MIB


def test_the_install_hint_is_printed_whole(tmp_path):
    """`llmup plan` prints the notes as they are (brackets included, one line each)."""
    snap = load_snapshot(MACHINES / "a6000-48gb.json")
    path = tmp_path / "here.json"
    path.write_text(snap.model_copy(update={"backends": detect_backends()}).model_dump_json())
    res = run_cli("plan", "--hardware", str(path))
    assert res.returncode == 0, res.stderr
    assert "note: the installed llama-cpp-python" in res.stdout
    assert "pip install 'llmup[exllamav2]'" in res.stdout
    pinned = run_cli("plan", "--hardware", str(path), "--backend", "exllamav2")
    assert pinned.returncode == 3
    assert "no candidate can run here: exllamav2 is not installed" in pinned.stderr
