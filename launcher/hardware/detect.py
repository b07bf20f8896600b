"""Build the hardware snapshot of this machine (what `llmup detect` prints)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

from launcher.hardware.apple import detect_apple, is_apple_silicon
from launcher.hardware.cpuspeed import cpu_speed
from launcher.hardware.installed import detect_backends
from launcher.hardware.nvidia import detect_nvidia_gpus
from launcher.hardware.runner import Runner
from launcher.hardware.snapshot import HardwareSnapshot, SystemInfo
from launcher.hardware.system import detect_system
from launcher.hardware.visible import select_gpus

log = logging.getLogger(__name__)


def detect(
    *,
    run: Runner | None = None,
    nvml: ModuleType | None = None,
    system: SystemInfo | None = None,
    home: Path | None = None,
    gpus: str | None = None,
    environ: Mapping[str, str] | None = None,
    held_pid: int | None = None,
) -> HardwareSnapshot:
    """Probe this machine: Metal on Apple Silicon, otherwise NVIDIA GPUs (possibly none).

    `run`, `nvml` and `system` replace the probes, so tests can replay recorded machines;
    a replayed machine (`system` given) gets no figures of this one: neither its installed
    backends nor its CPU speed, nor (unless `environ` is given) CUDA_VISIBLE_DEVICES.
    `home` caches the CPU speed probe (None: not measured) and the llama-cpp-python probe
    (None: probed every time); `gpus` is `--gpus`, which
    narrows the GPUs as CUDA_VISIBLE_DEVICES does. `held_pid`'s RAM counts as available
    (`detect_system`).
    """
    live = system is None
    system = system or detect_system(held_pid)
    snapshot = _devices(system, run=run, nvml=nvml)
    if environ is None and live:
        environ = os.environ
    snapshot = select_gpus(snapshot, gpus=gpus, environ=environ)
    if not live:
        return snapshot
    updates: dict = {"backends": detect_backends(run, home=home)}
    if home is not None:
        speed = cpu_speed(home, system)
        updates["system"] = system.model_copy(
            update={"memory_bandwidth_gbs": speed.memory_bandwidth_gbs, "cpu_gflops": speed.gflops}
        )
    return snapshot.model_copy(update=updates)


def _devices(system: SystemInfo, *, run: Runner | None, nvml: ModuleType | None):
    if is_apple_silicon(system.os, system.arch):
        gpu, unified = detect_apple(run=run)
        log.info("Apple Silicon %s: Metal budget %d MiB", gpu.name, unified.gpu_budget_mib)
        return HardwareSnapshot(gpus=[gpu], system=system, unified_memory=unified)
    found = detect_nvidia_gpus(run=run, nvml=nvml)
    log.info("found %d NVIDIA GPU(s)", len(found))
    return HardwareSnapshot(gpus=found, system=system)
