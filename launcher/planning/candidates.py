"""One candidate (model, backend, quant, context, placement) and its check against budgets."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from launcher.planning.budget import Budgets, DeviceBudget
from launcher.planning.memory import DeviceMemory
from launcher.planning.speed import Speed
from launcher.units import gib_text

CLASS_RANK = {"full": 2, "partial": 1, "cpu": 0}

# decode tokens/s of a placement (0 when unknown): how placements of one candidate compare
Score = Callable[[list[DeviceMemory], DeviceMemory], float]


@dataclass
class Candidate:
    """One way to serve a model; `fits` says whether the budgets hold it."""

    model_id: str
    params: int
    backend: str
    fmt: str
    quant: str
    bits_per_weight: float
    offload: str = "full"
    fits: bool = False
    reason: str = ""
    miss: int = 0
    gpus: list[DeviceMemory] = field(default_factory=list)
    host: DeviceMemory | None = None
    gpu_devices: list[DeviceBudget] = field(default_factory=list)
    host_budget: int = 0
    n_gpu_layers: int = 0
    tensor_split: list[float] = field(default_factory=list)
    excluded: dict[str, str] = field(default_factory=dict)  # GPU left out -> why
    speed: Speed | None = None
    legacy: bool = False
    recommended: bool = False
    meta: dict = field(default_factory=dict)

    @property
    def gpu_budgets(self) -> list[int]:
        return [g.budget for g in self.gpu_devices]

    @property
    def decode_tps(self) -> float | None:
        return self.speed.decode_tokens_per_s if self.speed else None

    def rank_key(self) -> tuple:
        """Class, then size, then precision, then the faster backend on NVIDIA, then quality."""
        return (
            CLASS_RANK[self.offload],
            self.params,
            round(self.bits_per_weight, 2),
            self.backend == "exllamav2",
            not self.legacy,
            self.recommended,
        )


def misses(
    gpus: list[DeviceMemory],
    gpu_devices: list[DeviceBudget],
    host: DeviceMemory | None,
    budgets: Budgets,
) -> list[tuple[int, str]]:
    """(bytes missing, why) for every device whose need exceeds its budget."""
    out = [
        (dev.total - gpu.budget, f"needs {gib_text(dev.total)} on {dev.device}, "
         f"{gib_text(gpu.budget)} free after reserve")
        for dev, gpu in zip(gpus, gpu_devices)
        if dev.total > gpu.budget
    ]  # fmt: skip
    host_need = host.total if host else 0
    if budgets.unified:
        host_need += sum(d.total for d in gpus)
    if host_need > budgets.host:
        out.append(
            (
                host_need - budgets.host,
                f"needs {gib_text(host_need)} of RAM, "
                f"{gib_text(budgets.host)} available after reserve",
            )
        )
    return out


def check_devices(cand: Candidate, budgets: Budgets) -> None:
    """Set fits/reason/miss from the per-device needs already placed on the candidate."""
    found = misses(cand.gpus, cand.gpu_devices, cand.host, budgets)
    cand.fits = not found
    cand.miss = max((m for m, _ in found), default=0)
    cand.reason = "; ".join(r for _, r in found)


def headroom(gpus: list[DeviceMemory], gpu_devices: list[DeviceBudget]) -> int:
    return sum(g.budget for g in gpu_devices) - sum(d.total for d in gpus)


def preference(gpu: DeviceBudget, score_one: Callable[[DeviceBudget], float]) -> tuple:
    """Faster, then larger cards first (used to cut the subsets on machines with many GPUs)."""
    return (score_one(gpu), gpu.budget)


def report_aggregate(cand: Candidate, budgets: Budgets) -> None:
    """A multi-GPU miss: the total need beside the total budget of the cards tried."""
    need, have = sum(d.total for d in cand.gpus), sum(cand.gpu_budgets)
    names = "+".join(d.device for d in cand.gpus)
    cand.fits = False
    cand.miss = max(need - have, cand.miss, 1)
    cand.reason = f"needs {gib_text(need)} on {names}, {gib_text(have)} free after reserve"
    if need <= have:
        cand.reason += ", but no split of whole layers fits every card"
    host = misses([], [], cand.host, budgets)
    if host:
        cand.reason += "; " + host[0][1]
