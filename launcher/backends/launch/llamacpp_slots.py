"""The worker part of the launch of llmup's own GGUF worker (session slots) for a plan.

`python -m launcher.workers.llamacpp_slots.server` gets every value the plan assumed: the context
of one sequence and `parallel` sequences (the KV cache the plan sized), batch sizes, layers on
the GPUs and their split, the KV cache type, flash attention, all physical cores, the RAM the
plan left for saved session states, and the folder beside the sessions database where they
go to disk. The common parts (host, port, environment, per-run key) are
`launch.backend_spec`'s. Building the command imports nothing heavy (no llama_cpp).
"""

from __future__ import annotations

from pathlib import Path

from launcher.backends.launch.llamacpp_python import model_bytes, ready_timeout_s
from launcher.backends.spec import WorkerLaunch
from launcher.engines import physical_cores
from launcher.errors import ModelFileError
from launcher.planning.plan import Plan

WORKER_MODULE = "launcher.workers.llamacpp_slots.server"
SLOTS_DIR = "slots"
DISK_SLOTS_MIB = 8192
DEFAULT_TTL_S = 7 * 86400.0


def launch(
    plan: Plan,
    model_path: Path,
    *,
    home: Path,
    threads: int | None = None,
    session_ttl_s: float | None = None,
    disk_mib: int = DISK_SLOTS_MIB,
    quick_start: bool = False,
) -> WorkerLaunch:
    """The slot worker serving `model_path` as planned; saved states under home/slots,
    expiring after `session_ttl_s` like the proxy's sessions. `quick_start`: a KV cache in
    RAM starts with one sequence and grows to the plan's behind the first requests
    (`grown_later`)."""
    if not model_path.is_file():
        raise ModelFileError(f"model file {model_path} does not exist; run `llmup pull` first")
    args = worker_args(
        plan,
        model_path,
        threads=threads or physical_cores(),
        slots_dir=home / SLOTS_DIR,
        session_ttl_s=session_ttl_s or DEFAULT_TTL_S,
        disk_mib=disk_mib,
    )
    if quick_start and grown_later(plan):
        args += ["--initial-parallel", "1"]
    return WorkerLaunch(
        name="llama.cpp",  # what the supervisor's messages call it; the log is its own
        module=WORKER_MODULE,
        args=args,
        ready_timeout_s=ready_timeout_s(model_bytes(model_path)),
        log_stem="llamacpp-slots",
        state_dirs=(home / SLOTS_DIR,),
    )


def grown_later(plan: Plan) -> bool:
    """Whether the worker may start on one sequence and grow to the plan's: only a KV cache
    in RAM (no layer on a GPU, whose memory the plan may have filled; zeroing VRAM is quick)
    and more than one sequence planned."""
    return plan.parallel > 1 and plan.placement.n_gpu_layers == 0


def worker_args(
    plan: Plan,
    model_path: Path,
    *,
    threads: int,
    slots_dir: Path,
    session_ttl_s: float,
    disk_mib: int,
) -> list[str]:
    """The worker's flags for a plan (--host and --port are the common launch's)."""
    s, placement = plan.settings, plan.placement
    args = [
        "--model", str(model_path),
        "--model-alias", plan.model.id,
        "--context", str(plan.context),
        "--parallel", str(plan.parallel),
        "--n-batch", str(s.n_batch),
        "--n-ubatch", str(s.n_ubatch),
        "--n-gpu-layers", str(placement.n_gpu_layers),
        "--kv-type", s.kv_cache_type.lower(),
        "--flash-attn", "on" if s.flash_attn else "off",
        "--threads", str(threads),
        "--slots-dir", str(slots_dir),
        "--slot-ram-mib", str(s.slot_ram_mib),
        "--slot-disk-mib", str(disk_mib),
        "--slot-ttl-s", str(session_ttl_s),
    ]  # fmt: skip
    if len(placement.devices) > 1:
        args += ["--tensor-split", ",".join(str(x) for x in placement.tensor_split)]
    return args
