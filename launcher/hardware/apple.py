"""Apple Silicon detection: unified memory and the Metal working-set budget.

On Apple Silicon the GPU has no memory of its own; Metal lets it wire only part of RAM
(`recommendedMaxWorkingSetSize`). That budget, not the RAM size, bounds what can be
offloaded. It is read with `sysctl`, through an injectable runner so the parsing can be
tested on any OS.
"""

from __future__ import annotations

import logging
import subprocess

from launcher.errors import DetectionError
from launcher.hardware.runner import Runner, run_command
from launcher.hardware.snapshot import Gpu, UnifiedMemory
from launcher.units import GIB, MIB

log = logging.getLogger(__name__)

# Metal's default: 2/3 of RAM up to this size, 3/4 above. Matches the budgets ggml logs:
# 16 GiB -> 10922.67 MiB, 32 GiB -> 21845.34 MiB, 64 GiB -> 49152 MiB.
TWO_THIRDS_UP_TO_BYTES = 36 * GIB


def metal_budget_mib(ram_bytes: int, wired_limit_mb: int = 0) -> int:
    """The GPU budget in MiB: `iogpu.wired_limit_mb` when the user set it, else Metal's rule.

    The override (in MiB despite its name) is capped at RAM: the kernel cannot wire more.
    """
    ram_mib = ram_bytes // MIB
    if wired_limit_mb > 0:
        return min(wired_limit_mb, ram_mib)
    if ram_bytes <= TWO_THIRDS_UP_TO_BYTES:
        return ram_mib * 2 // 3
    return ram_mib * 3 // 4


def is_apple_silicon(os_name: str, arch: str) -> bool:
    """Only macOS on arm64 has unified memory under Metal; Intel Macs take the CPU path."""
    return os_name == "darwin" and arch == "arm64"


def detect_apple(*, run: Runner | None = None) -> tuple[Gpu, UnifiedMemory]:
    """The Metal device and the unified-memory split, from three sysctl reads."""
    run = run or run_command
    ram_bytes = _sysctl_int(run, "hw.memsize")
    wired_limit_mb = _wired_limit_mb(run)
    budget = metal_budget_mib(ram_bytes, wired_limit_mb)
    name = _sysctl(run, "machdep.cpu.brand_string") or "Apple Silicon"
    gpu = Gpu(index=0, vendor="apple", name=name, memory_total_mib=budget, memory_free_mib=budget)
    return gpu, UnifiedMemory(ram_total_mib=ram_bytes // MIB, gpu_budget_mib=budget)


def _wired_limit_mb(run: Runner) -> int:
    """0 when unset or when this macOS has no such key (before Sonoma it did not)."""
    try:
        return _sysctl_int(run, "iogpu.wired_limit_mb")
    except DetectionError as exc:
        log.debug("no iogpu.wired_limit_mb override: %s", exc)
        return 0


def _sysctl(run: Runner, key: str) -> str:
    try:
        return run(["sysctl", "-n", key]).strip()
    except (OSError, subprocess.SubprocessError) as exc:
        raise DetectionError(
            f"`sysctl -n {key}` failed ({exc}); describe the machine with `--hardware FILE`"
        ) from None


def _sysctl_int(run: Runner, key: str) -> int:
    value = _sysctl(run, key)
    try:
        return int(value)
    except ValueError:
        raise DetectionError(
            f"`sysctl -n {key}` printed {value!r}, not a number; "
            "describe the machine with `--hardware FILE`"
        ) from None
