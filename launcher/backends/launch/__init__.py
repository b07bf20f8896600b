"""A plan's backend launch as one BackendSpec value, whichever backend the plan names.

The parts every backend shares live here once: the Python module run as the child, the
loopback address and private port, the child's environment (`backend_env`), the log file,
the model alias, the devices and the per-run key. Each backend module adds only what is its
own (`llamacpp_slots.launch` for llmup's GGUF worker, `llamacpp_python.launch` for
llama-cpp-python's server, `exllamav2.launch`: flags, ready timeout, names to scrub from the
environment).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from launcher.backends.launch import exllamav2, llamacpp_python, llamacpp_slots
from launcher.backends.spec import BackendSpec, WorkerLaunch
from launcher.netaddr import LOOPBACK, free_port
from launcher.planning.plan import Plan
from launcher.runkey import new_backend_key
from launcher.served import WorkerKind

HEALTH_PATH = "/health"  # both workers answer it without touching the model


def backend_spec(
    plan: Plan,
    model_path: Path,
    *,
    home: Path,
    port: int | None = None,
    python: str = sys.executable,
    threads: int | None = None,
    chat_format: str | None = None,
    session_ttl_s: float | None = None,
    quick_start: bool = False,
) -> BackendSpec:
    """The launch of the plan's backend serving `model_path` (a GGUF file, a GPTQ folder).

    `port` None picks a free one; `threads` and `chat_format` are llama.cpp's (see
    `llamacpp_python.launch`); `session_ttl_s` is when the slot worker's saved sessions expire;
    `quick_start` lets the slot worker grow its KV cache after it serves (serve's launches
    all do: see `llamacpp_slots.launch`).
    """
    worker = _worker(
        plan,
        Path(model_path),
        home=home,
        threads=threads,
        chat_format=chat_format,
        session_ttl_s=session_ttl_s,
        quick_start=quick_start,
    )
    port = free_port() if port is None else port
    alias = plan.model.id
    return BackendSpec(
        name=worker.name,
        command=[python, "-m", worker.module, *worker.args]
        + ["--host", LOOPBACK, "--port", str(port)],
        env=backend_env(plan),
        env_unset=worker.env_unset,
        port=port,
        health_path=HEALTH_PATH,
        ready_timeout_s=worker.ready_timeout_s,
        log_path=home / "logs" / f"{worker.log_stem}-{_slug(alias)}.log",
        model_alias=alias,
        devices=tuple(d.device for d in plan.placement.devices),
        api_key=new_backend_key(),
        state_dirs=worker.state_dirs,
    )


def _worker(
    plan: Plan,
    model_path: Path,
    *,
    home: Path,
    threads: int | None,
    chat_format: str | None,
    session_ttl_s: float | None,
    quick_start: bool = False,
) -> WorkerLaunch:
    """The launch of the worker the plan's kind names (`Plan.worker_kind`)."""
    kind = plan.worker_kind
    if kind is WorkerKind.LLAMACPP_PYTHON:
        return llamacpp_python.launch(plan, model_path, threads=threads, chat_format=chat_format)
    if kind is WorkerKind.LLAMACPP_SLOTS:
        return llamacpp_slots.launch(
            plan,
            model_path,
            home=home,
            threads=threads,
            session_ttl_s=session_ttl_s,
            quick_start=quick_start,
        )
    return exllamav2.launch(plan, model_path)


def backend_env(plan: Plan) -> dict[str, str]:
    """The launch environment: exactly the planned GPUs visible, in plan order.

    Plan devices name physical GPUs by nvidia-smi's index, which is PCI bus order, so the
    backend gets CUDA_DEVICE_ORDER=PCI_BUS_ID and CUDA_VISIBLE_DEVICES listing those indices
    (an inherited CUDA_VISIBLE_DEVICES was already honoured when the machine was detected,
    so the planned GPUs are among the ones it allowed). The backend then sees the plan's
    i-th GPU as its device i, which is what tensor_split and gpu_split are written for. A
    plan without CUDA devices hides every GPU, so nothing is allocated that was not planned.
    """
    cuda = [d.device for d in plan.placement.devices if d.device.startswith("cuda:")]
    return {
        "PYTHONUNBUFFERED": "1",
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "CUDA_VISIBLE_DEVICES": ",".join(d.split(":", 1)[1] for d in cuda),
    }


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "model"
