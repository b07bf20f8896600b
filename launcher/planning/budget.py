"""Memory budgets: what each device can give a model now, after reserves."""

from __future__ import annotations

from dataclasses import dataclass

from launcher.hardware.snapshot import HardwareSnapshot
from launcher.units import MIB


@dataclass(frozen=True)
class DeviceBudget:
    device: str  # cuda:0, metal:0
    kind: str  # cuda, metal
    budget: int  # bytes


@dataclass(frozen=True)
class Budgets:
    gpus: tuple[DeviceBudget, ...]
    host: int  # bytes of RAM the plan may use
    unified: bool  # Apple: GPU allocations come out of the same RAM

    @property
    def has_nvidia(self) -> bool:
        return any(g.kind == "cuda" for g in self.gpus)


def budgets_for(snapshot: HardwareSnapshot, *, reserve_mib: int, ram_reserve_mib: int) -> Budgets:
    """Free memory now minus a reserve: memory held by other processes is respected.

    On Apple Silicon the GPU budget is Metal's working-set limit (what detection put in
    memory_total_mib); its 'free' figure is not meaningful, the RAM check covers the rest.
    """
    gpus = []
    for gpu in snapshot.gpus:
        kind = "cuda" if gpu.vendor == "nvidia" else "metal"
        base = gpu.memory_free_mib if kind == "cuda" else gpu.memory_total_mib
        gpus.append(DeviceBudget(gpu.device, kind, max(base - reserve_mib, 0) * MIB))
    host = max(snapshot.system.ram_available_mib - ram_reserve_mib, 0) * MIB
    return Budgets(gpus=tuple(gpus), host=host, unified=snapshot.is_apple)
