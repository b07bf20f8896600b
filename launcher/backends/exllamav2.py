"""The launch of the project's exllamav2 worker for a GPTQ plan, as a BackendSpec value."""

from __future__ import annotations

import sys
from pathlib import Path

from launcher.backends.llamacpp import backend_env
from launcher.backends.spec import BackendSpec, free_port
from launcher.errors import ModelFileError, UsageError
from launcher.planning.plan import Plan

WORKER_MODULE = "launcher.backends.exllamav2_server"


def exllamav2_spec(
    plan: Plan,
    model_dir: Path,
    *,
    home: Path,
    port: int | None = None,
    python: str = sys.executable,
) -> BackendSpec:
    """Serve the GPTQ folder `model_dir` with the plan's context, cache mode and gpu_split."""
    if plan.backend != "exllamav2":
        raise UsageError(f"the plan is for {plan.backend}, not exllamav2")
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ModelFileError(f"{model_dir} is not a GPTQ model folder (no config.json)")
    port = free_port() if port is None else port
    args = [
        "--model-dir",
        str(model_dir),
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
        "--max-seq-len",
        str(plan.context),
        "--cache-mode",
        plan.settings.cache_mode or "FP16",
        "--model-alias",
        plan.model.id,
    ]
    if len(plan.placement.tensor_split) > 1:
        args += ["--gpu-split", ",".join(f"{g:g}" for g in plan.placement.tensor_split)]
    size = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    return BackendSpec(
        name="exllamav2",
        command=[python, "-m", WORKER_MODULE, *args],
        env=backend_env(plan),
        port=port,
        health_path="/health",
        ready_timeout_s=60 + 15 * size / 1e9,
        log_path=home / "logs" / f"exllamav2-{plan.model.id}.log",
        model_alias=plan.model.id,
        devices=tuple(d.device for d in plan.placement.devices),
    )
