"""After an out-of-memory load: what was missing, and the candidate that needs that much less.

The load log says what the failed allocation asked for and what was free. The wording is
llama.cpp's (as vendored by llama-cpp-python 0.3.36), one line each:

- src/llama.cpp, llama_model_load_from_file_impl: "%s: using device %s (%s) (%s) - %zu MiB
  free", e.g. `using device CUDA0 (NVIDIA RTX A6000) (0000:01:00.0) - 47910 MiB free`;
- ggml/src/ggml-cuda/ggml-cuda.cu, ggml_backend_cuda_buffer_type_alloc_buffer: "%s:
  allocating %.2f MiB on device %d: cudaMalloc failed: %s";
- ggml/src/ggml-alloc.c, alloc_tensor_range and ggml_gallocr_reserve_n: "%s: failed to
  allocate %s buffer of size %zu", e.g. `failed to allocate CUDA0 buffer of size 43014742016`;
- ggml/src/ggml-metal/ggml-metal-device.m, ggml_metal_buffer_init: "%s: error: failed to
  allocate buffer, size = %8.2f MiB".

Shortfall on the device = buffers already allocated there + the failed request - free at load.
The fallback is the best-ranked of the plan's fallbacks whose need on that device is at least
the shortfall (plus a margin) below the failed plan's; among the fallbacks of that same
model, one whose files are already downloaded is preferred. Without those figures in the
log (a CPU load killed by the kernel's OOM killer says nothing), the next fallback needing
less memory is taken, as before.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from launcher.backends.supervise.failure import OWN_LINE
from launcher.calibration.llamacpp_log import parse_load_log
from launcher.calibration.records import plan_device
from launcher.planning.plan import Plan, Source

log = logging.getLogger(__name__)

MARGIN_MIB = 256
BANNER = f"\n{OWN_LINE} "  # the supervisor's line before each attempt's output
FREE_RE = re.compile(r"using device (?P<dev>\S+) \(.*\) - (?P<free>\d+) MiB free")
CUDA_MALLOC_RE = re.compile(
    r"allocating (?P<mib>[\d.]+) MiB on device (?P<index>\d+): cudaMalloc failed"
)
ALLOC_RE = re.compile(r"failed to allocate (?P<buf>\S+) buffer of size (?P<bytes>\d+)")
METAL_RE = re.compile(
    r"ggml_metal_buffer_init: error: failed to allocate buffer, size =\s*(?P<mib>[\d.]+) MiB"
)


@dataclass(frozen=True)
class Shortfall:
    """What one device lacked when the load failed (MiB)."""

    buffer: str  # llama.cpp's name of the device: CUDA0, Metal
    device: str  # the plan's name: cuda:1, metal:0
    asked_mib: float
    allocated_mib: float
    free_mib: float

    @property
    def short_mib(self) -> float:
        """Never below 0: an allocation that failed with room to spare (fragmentation,
        another process) still needs a smaller candidate, by the margin at least."""
        return max(self.allocated_mib + self.asked_mib - self.free_mib, 0.0)

    def arithmetic(self) -> str:
        return (
            f"it asked for {self.asked_mib:.0f} MiB on {self.device} ({self.buffer}) with "
            f"{self.allocated_mib:.0f} MiB already allocated there and {self.free_mib:.0f} MiB "
            f"free at load: {self.short_mib:.0f} MiB short"
        )


@dataclass(frozen=True)
class Fallback:
    plan: Plan | None
    notice: str


def last_attempt(log_path: str | Path) -> str:
    """The backend's output in the last attempt of a supervisor log (after its banner, whose
    lines start with '==== ' and hold the command line)."""
    try:
        text = Path(log_path).read_text(errors="replace")
    except OSError:
        return ""
    lines = text[text.rfind(BANNER) + 1 :].splitlines(keepends=True) if BANNER in text else []
    while lines and lines[0].startswith("==== "):
        lines.pop(0)
    return "".join(lines) if BANNER in text else text


def parse_shortfall(text: str, plan: Plan) -> Shortfall | None:
    """The failed allocation, read from a load log; None when the log lacks the figures."""
    free = {m["dev"]: float(m["free"]) for m in FREE_RE.finditer(text)}
    failure = _failed_request(text)
    if failure is None:
        return None
    buffer, asked, at = failure
    if buffer not in free:
        return None
    before = parse_load_log(text[:at])
    allocated = sum(
        getattr(before, kind).get(buffer, 0.0) for kind in ("model", "kv", "compute", "output")
    )
    device = plan_device(buffer, plan)
    return Shortfall(buffer, device, asked, allocated, free[buffer])


def _failed_request(text: str) -> tuple[str, float, int] | None:
    """(llama.cpp device name, MiB asked, where in the log) of the first failed allocation."""
    if m := CUDA_MALLOC_RE.search(text):
        return f"CUDA{m['index']}", float(m["mib"]), m.start()
    if m := METAL_RE.search(text):
        return "Metal", float(m["mib"]), m.start()
    if m := ALLOC_RE.search(text):
        return m["buf"], int(m["bytes"]) / 2**20, m.start()
    return None


def device_need(plan: Plan, device: str) -> int:
    if device == "cpu":
        return plan.placement.ram_need_mib
    return next((d.need_mib for d in plan.placement.devices if d.device == device), 0)


def choose_fallback(
    plan: Plan,
    failed: Plan,
    load_log: str,
    *,
    tried: list[Plan],
    cached: Callable[[Source], bool],
) -> Fallback:
    """The plan to load after `failed` ran out of memory (`plan` holds the fallbacks)."""
    pending = [p for p in plan.fallbacks if p not in tried and p is not failed]
    smaller = [p for p in pending if p.memory_mib.total < failed.memory_mib.total]
    shortfall = parse_shortfall(load_log, failed)
    name = f"{failed.model.id} {failed.quant}"
    if shortfall is None:
        if not smaller:
            return Fallback(None, f"{name} ran out of memory and no fallback needs less")
        nxt = smaller[0]
        return Fallback(
            nxt,
            f"{name} ran out of memory while loading (the log gave no sizes); "
            f"falling back to {_label(nxt)} ({nxt.memory_mib.total} MiB in all)",
        )
    return _sized(failed, shortfall, smaller, cached)


def _sized(failed: Plan, s: Shortfall, smaller: list[Plan], cached) -> Fallback:
    name = f"{failed.model.id} {failed.quant}"
    needed = s.short_mib + MARGIN_MIB
    have = device_need(failed, s.device)
    enough = [p for p in smaller if have - device_need(p, s.device) >= needed]
    head = f"{name} ran out of memory while loading: {s.arithmetic()}"
    if not enough:
        return Fallback(None, f"{head}; no fallback needs {needed:.0f} MiB less there")
    best = enough[0]
    choice = next((p for p in enough if p.model.id == best.model.id and cached(p.source)), best)
    saved = have - device_need(choice, s.device)
    why = ", already downloaded" if cached(choice.source) else ""
    return Fallback(
        choice,
        f"{head}; falling back to {_label(choice)}, which needs {device_need(choice, s.device)} "
        f"MiB there instead of {have} ({saved} MiB less, at least {s.short_mib:.0f} + "
        f"{MARGIN_MIB} margin){why}",
    )


def _label(p: Plan) -> str:
    return f"{p.model.id} {p.quant} ({p.backend})"


def is_cached(source: Source) -> bool:
    """Every file of the source is in the Hugging Face cache (or it is a local file)."""
    if source.local_path:
        return Path(source.local_path).is_file()
    if not source.repo_id:
        return False
    from launcher.weights import cache

    folder = cache.hub_cache_dir()
    commit = cache.resolve_commit(folder, source.repo_id, source.revision) or source.revision
    names = [source.join.output] if source.join else []
    if any(cache.cached_file(folder, source.repo_id, n, commit) for n in names):
        return True
    return all(cache.cached_file(folder, source.repo_id, n, commit) for n in source.files)
