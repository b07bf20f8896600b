"""Memory budgets: what each device can give a model now, after reserves."""

from __future__ import annotations

from dataclasses import dataclass, replace

from launcher.hardware.snapshot import Gpu, HardwareSnapshot
from launcher.units import MIB


@dataclass(frozen=True)
class DeviceBudget:
    device: str  # the physical device: cuda:1, metal:0
    kind: str  # cuda, metal
    budget: int  # bytes
    name: str = ""
    uuid: str | None = None
    free_mib: int = 0  # what detection saw free, before the reserve


@dataclass(frozen=True)
class Budgets:
    gpus: tuple[DeviceBudget, ...]
    host: int  # bytes of RAM the plan may use
    unified: bool  # Apple: GPU allocations come out of the same RAM
    reserve_mib: int = 0

    @property
    def has_nvidia(self) -> bool:
        return any(g.kind == "cuda" for g in self.gpus)

    def only(self, kinds: set[str]) -> Budgets:
        """These budgets with only the GPUs of the given kinds (what a backend can use)."""
        kept = tuple(g for g in self.gpus if g.kind in kinds)
        return replace(self, gpus=kept)


def gpu_budget(gpu: Gpu, reserve_mib: int) -> DeviceBudget:
    """Free memory now minus the reserve; Apple: Metal's working-set budget.

    On Apple Silicon the 'free' figure is not meaningful; the RAM check covers the rest.
    """
    kind = "cuda" if gpu.vendor == "nvidia" else "metal"
    base = gpu.memory_free_mib if kind == "cuda" else gpu.memory_total_mib
    return DeviceBudget(
        device=gpu.device,
        kind=kind,
        budget=max(base - reserve_mib, 0) * MIB,
        name=gpu.name,
        uuid=gpu.uuid,
        free_mib=base,
    )


def budgets_for(snapshot: HardwareSnapshot, *, reserve_mib: int, ram_reserve_mib: int) -> Budgets:
    """Free memory now minus a reserve: memory held by other processes is respected."""
    gpus = tuple(gpu_budget(g, reserve_mib) for g in snapshot.gpus)
    host = max(snapshot.system.ram_available_mib - ram_reserve_mib, 0) * MIB
    return Budgets(gpus=gpus, host=host, unified=snapshot.is_apple, reserve_mib=reserve_mib)
