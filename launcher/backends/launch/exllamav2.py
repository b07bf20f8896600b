"""The exllamav2 worker's part of a GPTQ plan's launch (the rest is `launch.backend_spec`'s)."""

from __future__ import annotations

from pathlib import Path

from launcher.backends.spec import WorkerLaunch
from launcher.errors import ModelFileError
from launcher.planning.plan import Plan

WORKER_MODULE = "launcher.workers.exllamav2.server"
READY_BASE_S = 60.0
READY_PER_GB_S = 15.0


def launch(plan: Plan, model_dir: Path) -> WorkerLaunch:
    """Serve the GPTQ folder `model_dir` with the plan's context, cache mode and gpu_split."""
    if not (model_dir / "config.json").is_file():
        raise ModelFileError(f"{model_dir} is not a GPTQ model folder (no config.json)")
    args = [
        "--model-dir", str(model_dir),
        "--max-seq-len", str(plan.context),
        "--cache-mode", plan.settings.cache_mode or "FP16",
        "--model-alias", plan.model.id,
    ]  # fmt: skip
    if len(plan.placement.tensor_split) > 1:
        args += ["--gpu-split", ",".join(f"{g:g}" for g in plan.placement.tensor_split)]
    size = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    return WorkerLaunch(
        name="exllamav2",
        module=WORKER_MODULE,
        args=args,
        ready_timeout_s=READY_BASE_S + READY_PER_GB_S * size / 1e9,
        log_stem="exllamav2",
    )
