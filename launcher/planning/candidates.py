"""Evaluating one candidate (model, backend, quant, context) against the budgets."""

from __future__ import annotations

from dataclasses import dataclass, field

from launcher.catalog.shape import ModelShape
from launcher.planning import exllamav2 as exl
from launcher.planning.budget import Budgets
from launcher.planning.llamacpp import (
    DEVICE_OVERHEAD,
    LlamaCppSettings,
    compute_bytes,
    kv_bytes_per_layer,
    memory_by_device,
)
from launcher.planning.memory import DeviceMemory
from launcher.planning.placement import split_units
from launcher.units import gib_text

CLASS_RANK = {"full": 2, "partial": 1, "cpu": 0}


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
    gpu_budgets: list[int] = field(default_factory=list)
    host_budget: int = 0
    n_gpu_layers: int = 0
    tensor_split: list[float] = field(default_factory=list)
    legacy: bool = False
    recommended: bool = False
    meta: dict = field(default_factory=dict)

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


def check_devices(cand: Candidate, budgets: Budgets) -> None:
    """Set fits/reason/miss from the per-device needs already placed on the candidate."""
    misses = []
    for dev, budget in zip(cand.gpus, cand.gpu_budgets):
        if dev.total > budget:
            misses.append(
                (
                    dev.total - budget,
                    f"needs {gib_text(dev.total)} on {dev.device}, "
                    f"{gib_text(budget)} free after reserve",
                )
            )
    host_need = cand.host.total if cand.host else 0
    if budgets.unified:
        host_need += sum(d.total for d in cand.gpus)
    if host_need > budgets.host:
        misses.append(
            (
                host_need - budgets.host,
                f"needs {gib_text(host_need)} of RAM, "
                f"{gib_text(budgets.host)} available after reserve",
            )
        )
    cand.fits = not misses
    cand.miss = max((m for m, _ in misses), default=0)
    cand.reason = "; ".join(r for _, r in misses)


def place_llamacpp(
    cand: Candidate,
    shape: ModelShape,
    settings: LlamaCppSettings,
    budgets: Budgets,
    *,
    allow_offload: bool,
) -> None:
    """Try full offload, then (if allowed) fewer layers on the GPUs, then the CPU alone."""
    n_layer = shape.arch.n_layer
    kinds = [g.kind for g in budgets.gpus]
    cand.gpu_budgets = [g.budget for g in budgets.gpus]
    cand.host_budget = budgets.host
    tries = [n_layer + 1] + (list(range(n_layer, 0, -1)) if allow_offload else [])
    for k in tries if kinds else []:
        split = _llamacpp_split(shape, settings, budgets, k)
        if split is None:
            continue
        _apply(cand, shape, settings, kinds, k, [float(c) for c in split])
        cand.offload = "full" if k > n_layer else "partial"
        check_devices(cand, budgets)
        if cand.fits:
            return
    if not kinds or allow_offload:
        _apply(cand, shape, settings, [], 0, [])
        cand.gpu_budgets, cand.offload = [], "cpu"
        check_devices(cand, budgets)
        return
    _report_full_offload_miss(cand, shape, settings, budgets, kinds)


def _apply(cand, shape, settings, kinds, k, split) -> None:
    cand.gpus, cand.host = memory_by_device(
        shape, settings, gpu_kinds=kinds, n_gpu_layers=k, tensor_split=split
    )
    cand.n_gpu_layers, cand.tensor_split = k, split


def _llamacpp_split(shape, settings, budgets: Budgets, k: int) -> list[int] | None:
    """Layer counts per GPU for the last k units (blocks, then the output layer)."""
    n_layer = shape.arch.n_layer
    kv = kv_bytes_per_layer(shape, settings)
    units = [shape.layout.layers[i] + kv for i in range(max(n_layer - k, 0), n_layer)]
    if k > n_layer:
        units.append(shape.layout.output)
    fixed = compute_bytes(shape, settings)
    caps = [g.budget - DEVICE_OVERHEAD[g.kind] - fixed for g in budgets.gpus]
    return split_units(units, caps)


def _report_full_offload_miss(cand, shape, settings, budgets: Budgets, kinds) -> None:
    """Nothing placed: report the full-offload need, split as llama.cpp's default would."""
    weights = [float(g.budget) for g in budgets.gpus]
    _apply(cand, shape, settings, kinds, shape.arch.n_layer + 1, weights)
    cand.offload = "full"
    check_devices(cand, budgets)
    if cand.fits or len(kinds) > 1:  # a split that rounds badly: report the aggregate
        need = sum(d.total for d in cand.gpus)
        have = sum(cand.gpu_budgets)
        names = "+".join(d.device for d in cand.gpus)
        cand.fits = False
        cand.miss = max(need - have, cand.miss, 1)
        cand.reason = f"needs {gib_text(need)} on {names}, {gib_text(have)} free after reserve"


def place_exllamav2(cand: Candidate, spec, variant, settings, budgets: Budgets) -> None:
    """GPTQ runs on NVIDIA GPUs only, every layer on a GPU (exllamav2 has no CPU path)."""
    arch = spec.architecture
    emb = spec.gptq.embedding_bytes
    cuda = [g for g in budgets.gpus if g.kind == "cuda"]
    cand.gpu_budgets, cand.host_budget = [g.budget for g in cuda], budgets.host
    probe, _ = exl.memory_by_device(arch, variant, emb, settings, [1] * len(cuda))
    per_layer = exl.layer_weight_bytes(arch, variant, emb) + (
        exl.cache_bytes_per_token_layer(arch, settings.cache_mode) * settings.max_seq_len
    )
    units = [per_layer] * arch.n_layer
    caps = [
        g.budget - (d.total - d.weights - d.kv_cache + exl.quant_temp_bytes(arch, settings))
        for g, d in zip(cuda, probe)
    ]
    caps[-1] -= emb  # lm_head sits with the last layers
    counts = split_units(units, caps) or _even(arch.n_layer, cand.gpu_budgets)
    cand.gpus, cand.host = exl.memory_by_device(arch, variant, emb, settings, counts)
    cand.n_gpu_layers = arch.n_layer
    # exllamav2's gpu_split: GiB per device for weights plus that device's scratch buffers
    cand.tensor_split = [round((d.weights + d.compute) / 2**30 + 0.05, 2) for d in cand.gpus]
    check_devices(cand, budgets)
    if not cand.fits and len(cuda) > 1:
        need, have = sum(d.total for d in cand.gpus), sum(cand.gpu_budgets)
        cand.miss = max(need - have, cand.miss)
        names = "+".join(d.device for d in cand.gpus)
        cand.reason = f"needs {gib_text(need)} on {names}, {gib_text(have)} free after reserve"


def _even(n: int, budgets: list[int]) -> list[int]:
    """A proportional split for reporting a miss when no split fits."""
    total = sum(budgets) or 1
    counts = [n * b // total for b in budgets]
    counts[-1] += n - sum(counts)
    return counts
