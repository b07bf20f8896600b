"""How this machine differs from the one a profile describes, in words a warning can use.

`llmup serve --profile NAME` plans the machine it runs on; when that is not the profile's
machine (another GPU, less free memory, fewer cores), the user should hear it before the
plan surprises them. Free memory varies from run to run, so only a real shortfall counts.
"""

from __future__ import annotations

from launcher.hardware.snapshot import Gpu, HardwareSnapshot
from launcher.units import mib_gib_text as gib

TOTAL_TOLERANCE = 0.03  # memory totals within 3% are the same part (drivers report a bit less)
FREE_TOLERANCE_MIB = 1024  # less free memory than this below the profile's is noise
RAM_TOLERANCE = 0.10  # available RAM moves with the page cache; a tenth less is noise


def differences(expected: HardwareSnapshot, actual: HardwareSnapshot) -> list[str]:
    """Each difference that can change a plan, as a short phrase; [] when none does."""
    found = _system(expected, actual)
    found += _gpu_count(expected.gpus, actual.gpus)
    for want, have in zip(expected.gpus, actual.gpus):
        found += _gpu(want, have)
    return found


def _gpu_count(expected: list[Gpu], actual: list[Gpu]) -> list[str]:
    if len(expected) == len(actual):
        return []
    return [f"{_count(actual)} found, the profile expects {_count(expected)}"]


def _count(gpus: list[Gpu]) -> str:
    if not gpus:
        return "no GPU"
    names = sorted({g.name for g in gpus})
    return f"{len(gpus)} GPU{'s' if len(gpus) > 1 else ''} ({', '.join(names)})"


def _gpu(want: Gpu, have: Gpu) -> list[str]:
    dev = have.device
    found = []
    if want.name != have.name:
        found.append(f"{dev} is {have.name}, the profile expects {want.name}")
    if _differs(want.memory_total_mib, have.memory_total_mib):
        found.append(
            f"{dev} has {gib(have.memory_total_mib)} in all, the profile expects "
            f"{gib(want.memory_total_mib)}"
        )
    elif have.memory_free_mib < want.memory_free_mib - FREE_TOLERANCE_MIB:
        found.append(
            f"{dev} has {gib(have.memory_free_mib)} free, the profile expects "
            f"{gib(want.memory_free_mib)}"
        )
    return found


def _system(expected: HardwareSnapshot, actual: HardwareSnapshot) -> list[str]:
    want, have = expected.system, actual.system
    found = []
    if (want.os, want.arch) != (have.os, have.arch):
        found.append(f"this is {have.os}/{have.arch}, the profile expects {want.os}/{want.arch}")
    if want.cpu_cores != have.cpu_cores:
        found.append(f"{have.cpu_cores} CPU cores, the profile expects {want.cpu_cores}")
    if _differs(want.ram_total_mib, have.ram_total_mib):
        found.append(
            f"{gib(have.ram_total_mib)} of RAM, the profile expects {gib(want.ram_total_mib)}"
        )
    elif have.ram_available_mib < want.ram_available_mib - max(
        FREE_TOLERANCE_MIB, RAM_TOLERANCE * want.ram_available_mib
    ):
        found.append(
            f"{gib(have.ram_available_mib)} of RAM available, the profile expects "
            f"{gib(want.ram_available_mib)}"
        )
    return found


def _differs(want: int, have: int) -> bool:
    return abs(want - have) > TOTAL_TOLERANCE * max(want, have, 1)


def mismatch_warning(name: str, found: list[str]) -> str:
    return (
        f"this machine is not the one profile {name} describes: {'; '.join(found)}. "
        f"The plan is for this machine; `--hardware profile` plans the profile's own."
    )
