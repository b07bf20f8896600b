"""Host RAM and CPU: the budget for CPU-only and partially offloaded plans."""

from __future__ import annotations

import platform
import subprocess
import sys

import psutil

from launcher.hardware.runner import run_command
from launcher.hardware.snapshot import SystemInfo
from launcher.units import MIB

_ARCH_ALIASES = {
    "amd64": "x86_64",
    "x64": "x86_64",
    "x86_64": "x86_64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "armv8": "arm64",
}


def detect_system() -> SystemInfo:
    """RAM figures now (available, not free: page cache can be reclaimed) and core counts."""
    memory = psutil.virtual_memory()
    threads = psutil.cpu_count(logical=True) or 1
    return SystemInfo(
        os=normalise_os(sys.platform),
        arch=normalise_arch(platform.machine()),
        cpu_cores=psutil.cpu_count(logical=False) or threads,
        cpu_threads=threads,
        cpu_name=cpu_name(),
        ram_total_mib=memory.total // MIB,
        ram_available_mib=memory.available // MIB,
    )


def cpu_name() -> str | None:
    """'AMD EPYC 9654 96-Core Processor', 'Apple M2 Max': the name speed figures key on."""
    if sys.platform == "darwin":
        try:
            return run_command(["sysctl", "-n", "machdep.cpu.brand_string"]).strip() or None
        except (OSError, subprocess.SubprocessError):
            return platform.processor() or None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip() or None
    except OSError:
        pass
    return platform.processor() or None


def normalise_os(sys_platform: str) -> str:
    """'linux', 'darwin' or 'windows', the spellings snapshots and profiles use."""
    if sys_platform.startswith("linux"):
        return "linux"
    if sys_platform.startswith(("win32", "cygwin", "msys")):
        return "windows"
    return sys_platform.lower()


def normalise_arch(machine: str) -> str:
    """One name per architecture: Windows says AMD64, Linux aarch64, macOS arm64."""
    return _ARCH_ALIASES.get(machine.lower(), machine.lower())
