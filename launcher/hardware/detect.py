"""Build the hardware snapshot of this machine (what `llmup detect` prints)."""

from __future__ import annotations

import logging
from types import ModuleType

from launcher.hardware.apple import detect_apple, is_apple_silicon
from launcher.hardware.nvidia import detect_nvidia_gpus
from launcher.hardware.runner import Runner
from launcher.hardware.snapshot import HardwareSnapshot, SystemInfo
from launcher.hardware.system import detect_system

log = logging.getLogger(__name__)


def detect(
    *,
    run: Runner | None = None,
    nvml: ModuleType | None = None,
    system: SystemInfo | None = None,
) -> HardwareSnapshot:
    """Probe this machine: Metal on Apple Silicon, otherwise NVIDIA GPUs (possibly none).

    `run`, `nvml` and `system` replace the probes, so tests can replay recorded machines.
    """
    system = system or detect_system()
    if is_apple_silicon(system.os, system.arch):
        gpu, unified = detect_apple(run=run)
        log.info("Apple Silicon %s: Metal budget %d MiB", gpu.name, unified.gpu_budget_mib)
        return HardwareSnapshot(gpus=[gpu], system=system, unified_memory=unified)
    gpus = detect_nvidia_gpus(run=run, nvml=nvml)
    log.info("found %d NVIDIA GPU(s)", len(gpus))
    return HardwareSnapshot(gpus=gpus, system=system)
