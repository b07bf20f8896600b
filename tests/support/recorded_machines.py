"""Machines recorded from real probes (nvidia-smi CSV, sysctl listings) with the system
figures they were paired with: what the hardware tests detect, the machine files under
tests/data/machines are built from, and planning tests plan on."""

from __future__ import annotations

import subprocess
from pathlib import Path

from launcher.hardware.detect import detect
from launcher.hardware.snapshot import HardwareSnapshot, SystemInfo

DATA = Path(__file__).parents[1] / "data"
SMI = DATA / "nvidia-smi"
SYSCTL = DATA / "sysctl"
MACHINES = DATA / "machines"


def linux(cores: int, threads: int, total: int, available: int, **speed) -> SystemInfo:
    return SystemInfo(
        os="linux",
        arch="x86_64",
        cpu_cores=cores,
        cpu_threads=threads,
        ram_total_mib=total,
        ram_available_mib=available,
        **speed,
    )


def darwin(cores: int, total: int, available: int) -> SystemInfo:
    return SystemInfo(
        os="darwin",
        arch="arm64",
        cpu_cores=cores,
        cpu_threads=cores,
        ram_total_mib=total,
        ram_available_mib=available,
    )


# machine file -> (recorded probe output or None, the fixed SystemInfo it was paired with)
MACHINE_SPECS: dict[str, tuple[Path | None, SystemInfo]] = {
    "cpu-16gb": (None, linux(8, 16, 15880, 13900)),
    "cpu-64gb": (None, linux(16, 32, 64215, 60100)),
    # this project's CI machine, with the CPU figures `llmup detect` measured on it
    "cpu-2core-24gb": (
        None,
        linux(
            2, 2, 24105, 23119, cpu_name="AMD EPYC", memory_bandwidth_gbs=30.42, cpu_gflops=186.1
        ),
    ),
    "apple-m2-16gb": (SYSCTL / "apple-m2-16gb.txt", darwin(8, 16384, 9800)),
    "apple-m2max-64gb": (SYSCTL / "apple-m2max-64gb.txt", darwin(12, 65536, 41000)),
    "rtx3060-12gb": (SMI / "rtx3060-12gb.csv", linux(6, 12, 32026, 28900)),
    "rtx4090-24gb": (SMI / "rtx4090-24gb.csv", linux(16, 32, 64215, 59800)),
    "a6000-48gb": (SMI / "a6000-idle.csv", linux(16, 32, 128000, 120000)),
    "a6000x2-busy": (SMI / "a6000x2-busy.csv", linux(32, 64, 257560, 231000)),
    "a100-80gb": (SMI / "a100-80gb.csv", linux(32, 64, 257560, 248000)),
    "a6000x2-second-full": (SMI / "a6000x2-second-full.csv", linux(32, 64, 257560, 231000)),
    "gt1030-rtx4090": (SMI / "gt1030-rtx4090.csv", linux(8, 16, 64215, 58000)),
    "rtx3090-3060-a4000": (SMI / "rtx3090-3060-a4000.csv", linux(16, 32, 128000, 118000)),
}


class NoNvml:
    """A pynvml stand-in whose init fails like it does on a machine without the library."""

    class NVMLError(Exception):
        pass

    def nvmlInit(self) -> None:
        raise self.NVMLError("NVML Shared Library Not Found")


def replay(recording: Path | None):
    """A runner answering nvidia-smi with a recorded CSV and `sysctl -n KEY` from a
    recorded `sysctl KEY...` listing; a missing recording means the tool is not installed."""

    def run(cmd: list[str]) -> str:
        if recording is None:
            raise FileNotFoundError(cmd[0])
        text = recording.read_text()
        if cmd[0] == "nvidia-smi":
            return text
        if cmd[:2] == ["sysctl", "-n"]:
            values = dict(line.split(": ", 1) for line in text.splitlines() if line)
            if cmd[2] not in values:
                raise subprocess.CalledProcessError(1, cmd, stderr=f"unknown oid '{cmd[2]}'")
            return values[cmd[2]] + "\n"
        raise FileNotFoundError(cmd[0])

    return run


def build_machine(name: str) -> HardwareSnapshot:
    recording, system = MACHINE_SPECS[name]
    return detect(run=replay(recording), nvml=NoNvml(), system=system)


def recorded(name: str, **kw) -> HardwareSnapshot:
    recording, system = MACHINE_SPECS[name]
    return detect(run=replay(recording), nvml=NoNvml(), system=system, **kw)
