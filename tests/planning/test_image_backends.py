"""A backend that runs in llmup's image (`--runtime docker`, LLMUP_RUNTIME=docker) is planned
for what the image has installed, not for this Python: on an NVIDIA machine whose own
llama-cpp-python is a CPU build the plan still offloads (the CUDA image) and may pick
exllamav2; on a Mac the container's llama.cpp cannot reach the GPU, so the plan is for the
CPU. The image's versions follow the Dockerfile's build arguments."""

from __future__ import annotations

import json
import re

from conftest import MACHINES, run_cli

from launcher.hardware.images import EXLLAMAV2_VERSION, TORCH_CUDA, TORCH_VERSION, in_image
from launcher.hardware.snapshot import InstalledBackends, LlamaCppInstall, load_snapshot
from launcher.planning import PlanRequest, make_plan

ROOT = MACHINES.parents[2]
CPU_BUILD = InstalledBackends(llama_cpp=LlamaCppInstall(installed=True, version="0.3.36"))


def _with_cpu_build(name: str):
    return load_snapshot(MACHINES / name).model_copy(update={"backends": CPU_BUILD})


def test_a_cpu_build_here_plans_the_cpu_and_names_both_ways_to_the_gpu():
    plan = make_plan(PlanRequest(hardware=_with_cpu_build("rtx4090-24gb.json"), model="7b"))
    assert plan.placement.n_gpu_layers == 0
    note = next(n for n in plan.notes if "CPU build" in n)
    assert "-DGGML_CUDA=on" in note and "--runtime docker" in note


def test_the_cuda_image_offloads_where_this_python_cannot():
    snap = in_image(_with_cpu_build("rtx4090-24gb.json"), "llmup:cpu", "llmup:cuda")
    plan = make_plan(PlanRequest(hardware=snap, model="7b"))
    assert plan.placement.n_gpu_layers > 0
    assert "planned for the backends installed in the llmup:cuda image" in plan.notes
    assert not any("GPTQ candidates skipped" in n for n in plan.notes)


def test_a_container_on_a_mac_plans_the_cpu_and_says_why():
    snap = in_image(load_snapshot(MACHINES / "apple-m2max-64gb.json"), "llmup:cpu", "llmup:cuda")
    plan = make_plan(PlanRequest(hardware=snap, model="7b"))
    assert plan.placement.n_gpu_layers == 0
    assert any("llmup:cpu image" in n and "from a container" in n for n in plan.notes)


def test_llmup_plan_with_the_docker_runtime(tmp_path):
    machine = tmp_path / "nvidia-cpu-build.json"
    machine.write_text(_with_cpu_build("rtx4090-24gb.json").model_dump_json())
    args = ("plan", "--hardware", str(machine), "--model", "7b", "--json")
    local = json.loads(run_cli(*args).stdout)
    docker = json.loads(run_cli(*args, env={"LLMUP_RUNTIME": "docker"}).stdout)
    assert local["placement"]["n_gpu_layers"] == 0 < docker["placement"]["n_gpu_layers"]


def test_the_image_versions_are_the_dockerfiles():
    text = (ROOT / "docker" / "Dockerfile.cuda").read_text()
    args = dict(re.findall(r"^ARG (\w+)=\"?([^\"\n]+)\"?$", text, re.MULTILINE))
    assert args["TORCH_VERSION"] == TORCH_VERSION
    assert args["EXLLAMAV2_VERSION"] == EXLLAMAV2_VERSION
    assert args["CUDA_VERSION"].startswith(TORCH_CUDA + ".")
