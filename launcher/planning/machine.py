"""The machine as the planner sees it: budgets, what each backend may use, device speeds."""

from __future__ import annotations

from dataclasses import dataclass

from launcher.planning.backend_access import BackendAccess, backend_access
from launcher.planning.budget import Budgets, budgets_for
from launcher.planning.candidates import Candidate, Score
from launcher.planning.memory import DeviceMemory
from launcher.planning.request import PlanRequest
from launcher.planning.speed import DeviceRate, Speed, device_rates, estimate, placement_work


@dataclass(frozen=True)
class Machine:
    budgets: Budgets
    access: BackendAccess
    rates: dict[str, DeviceRate]
    n_ubatch: int

    @property
    def llamacpp_budgets(self) -> Budgets:
        """Only the GPUs the installed llama-cpp-python can offload to."""
        return self.budgets.only(set(self.access.llamacpp_kinds))

    def speed(self, devices: list[DeviceMemory], model: ModelCost) -> Speed:
        work = placement_work(
            devices, params=model.matmul_params, host_unread=model.host_unread, n_embd=model.n_embd
        )
        return estimate(work, self.rates, n_ubatch=self.n_ubatch, unified=self.budgets.unified)

    def score(self, model: ModelCost) -> Score:
        """Decode tokens/s of a placement (0 when unknown): what placements are chosen by."""

        def decode(gpus: list[DeviceMemory], host: DeviceMemory) -> float:
            return self.speed([*gpus, host], model).decode_tokens_per_s or 0.0

        return decode

    def attach_speed(self, cand: Candidate, model: ModelCost) -> None:
        if cand.host is not None:
            cand.speed = self.speed([*cand.gpus, cand.host], model)


@dataclass(frozen=True)
class ModelCost:
    """What a model costs per token, for the speed estimate."""

    matmul_params: int  # weights multiplied per token (all but the input embedding)
    host_unread: int  # bytes the host holds but reads one row of per token (token_embd)
    n_embd: int


def machine_for(req: PlanRequest) -> Machine:
    budgets = budgets_for(
        req.hardware, reserve_mib=req.reserve_mib, ram_reserve_mib=req.ram_reserve_mib
    )
    return Machine(budgets, backend_access(req.hardware), device_rates(req.hardware), req.n_ubatch)
