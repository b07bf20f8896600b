"""The docker runtime's container, read as a value (no engine needed), and its refusals.

What runs for real against an engine is in test_docker.py (marked `docker`)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import MACHINES, run_cli
from support.ggufgen import write_llama_gguf

from launcher.backends.launch import backend_spec
from launcher.backends.spec import BackendSpec
from launcher.backends.supervise.container import (
    BACKEND_LABEL,
    accelerator,
    container_options,
    image_for,
    weight_mounts,
)
from launcher.errors import DockerRuntimeError
from launcher.hardware.snapshot import load_snapshot
from launcher.planning import PlanRequest, make_plan
from launcher.runkey import KEY_ENV
from launcher.settings import DockerSettings


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_llama_gguf(tmp_path_factory.mktemp("m") / "tiny.gguf", tensor_type="F32")


def plan_for(machine: str, **kw):
    return make_plan(PlanRequest(hardware=load_snapshot(MACHINES / f"{machine}.json"), **kw))


def test_two_gpu_plan_requests_exactly_its_gpus_and_publishes_on_loopback(tiny, tmp_path):
    plan = plan_for("a6000x2-busy", model="70b")
    spec = backend_spec(plan, tiny, home=tmp_path, port=41001)
    opts = container_options(spec, image="llmup:cuda", weights=[tiny], user="1000:1000")
    assert opts["device_requests"] == [
        {"Driver": "nvidia", "DeviceIDs": ["0", "1"], "Capabilities": [["gpu"]]}
    ]
    assert opts["ports"] == {"41001/tcp": ("127.0.0.1", 41001)}
    assert "CUDA_VISIBLE_DEVICES" not in opts["environment"]  # renumbered from 0 inside
    assert opts["environment"]["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert opts["environment"][KEY_ENV] == spec.api_key  # the run's key reaches the worker
    slots = str(tmp_path / "slots")  # the slot worker's saved sessions persist on the host
    assert opts["mounts"] == [
        {"Target": str(tiny), "Source": str(tiny.resolve()), "Type": "bind", "ReadOnly": True},
        {"Target": slots, "Source": slots, "Type": "bind", "ReadOnly": False},
    ]
    command = opts["command"]
    assert command[:3] == ["python", "-m", "launcher.workers.llamacpp_slots.server"]
    assert command[command.index("--slots-dir") + 1] == slots
    assert command[command.index("--host") + 1] == "0.0.0.0"
    assert command[command.index("--model") + 1] == str(tiny)  # the mount's own path
    assert opts["labels"][BACKEND_LABEL] == "llama.cpp"
    assert opts["user"] == "1000:1000" and opts["entrypoint"] == []


def test_one_planned_gpu_of_two_is_the_only_one_requested(tmp_path):
    spec = BackendSpec(
        name="llama.cpp",
        command=["/usr/bin/python3", "-m", "worker", "--host", "127.0.0.1", "--port", "41002"],
        port=41002,
        log_path=tmp_path / "log",
        env={"CUDA_VISIBLE_DEVICES": "1"},
        devices=("cuda:1",),
    )
    opts = container_options(spec, image="llmup:cuda", weights=[])
    assert opts["device_requests"][0]["DeviceIDs"] == ["1"]
    assert "CUDA_VISIBLE_DEVICES" not in opts["environment"]


def test_cpu_plan_requests_no_gpu_and_hides_them(tiny, tmp_path):
    plan = plan_for("cpu-2core-24gb", model_file=tiny, context=512)
    spec = backend_spec(plan, tiny, home=tmp_path, port=41003)
    opts = container_options(spec, image="llmup:cpu", weights=[tiny])
    assert opts["device_requests"] == []
    assert opts["environment"]["CUDA_VISIBLE_DEVICES"] == ""


def test_hub_cache_files_mount_their_whole_repository_folder(tmp_path):
    repo = tmp_path / "hub" / "models--TheBloke--Llama-2-7B-Chat-GGUF"
    blob = repo / "blobs" / "abc123"
    blob.parent.mkdir(parents=True)
    blob.write_bytes(b"GGUF")
    snap = repo / "snapshots" / "rev" / "llama-2-7b-chat.Q8_0.gguf"
    snap.parent.mkdir(parents=True)
    snap.symlink_to("../../blobs/abc123")
    assert weight_mounts([snap]) == {str(repo): str(repo.resolve())}


def test_image_follows_the_plans_accelerator(tiny):
    cfg = DockerSettings(cpu_image="my:cpu", cuda_image="my:cuda")
    assert image_for(plan_for("cpu-16gb"), cfg) == "my:cpu"
    assert image_for(plan_for("rtx4090-24gb"), cfg) == "my:cuda"
    assert accelerator(plan_for("a100-80gb", backend="exllamav2")) == "cuda"
    with pytest.raises(DockerRuntimeError, match="Apple's GPU"):
        accelerator(plan_for("apple-m2-16gb"))


def test_command_without_host_flag_is_refused(tmp_path):
    spec = BackendSpec(name="odd", command=["server"], port=1, log_path=tmp_path / "l")
    with pytest.raises(DockerRuntimeError, match="cannot run it"):
        container_options(spec, image="x", weights=[])


def test_no_engine_is_one_line_and_exit_1(tiny):
    result = run_cli(
        "serve",
        "--runtime",
        "docker",
        "--model-file",
        str(tiny),
        "--quiet",
        env={"DOCKER_HOST": "unix:///nonexistent/docker.sock"},
    )
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach a docker engine" in lines[0], result.stderr
    assert "unix:///nonexistent/docker.sock" in lines[0]


def test_unknown_runtime_is_a_usage_error(tiny):
    result = run_cli("serve", "--runtime", "podman", "--model-file", str(tiny))
    assert result.returncode == 2 and "--runtime must be local or docker" in result.stderr
