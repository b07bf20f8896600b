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


def detect_system(held_pid: int | None = None) -> SystemInfo:
    """RAM figures now (available, not free: page cache can be reclaimed) and core counts.

    `held_pid`: a process whose memory counts as available, because what it holds is what the
    plan being made will use (the backend a head start spawned for this very plan)."""
    memory = psutil.virtual_memory()
    held = held_by(held_pid) if held_pid is not None else 0
    threads = psutil.cpu_count(logical=True) or 1
    return SystemInfo(
        os=normalise_os(sys.platform),
        arch=normalise_arch(platform.machine()),
        cpu_cores=psutil.cpu_count(logical=False) or threads,
        cpu_threads=threads,
        cpu_name=cpu_name(),
        ram_total_mib=memory.total // MIB,
        ram_available_mib=min(memory.available + held, memory.total) // MIB,
    )


def held_by(pid: int) -> int:
    """Bytes of RAM a process and its children hold that the page cache could not give back
    (resident minus file-backed shared pages); 0 when it is gone."""
    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
        return sum(_private_resident(p.memory_info()) for p in tree)
    except psutil.Error:
        return 0


def _private_resident(info) -> int:
    """Resident bytes not backed by a file (Linux reports `shared`; elsewhere all of rss)."""
    return max(info.rss - getattr(info, "shared", 0), 0)


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
