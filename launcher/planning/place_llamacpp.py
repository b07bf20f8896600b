"""Placing a GGUF model for llama.cpp: every layer on the best subset of GPUs, else (when
allowed) as many layers as the GPUs hold, else the CPU alone."""

from __future__ import annotations

from launcher.catalog.shape import ModelShape
from launcher.planning.budget import Budgets, DeviceBudget
from launcher.planning.candidates import (
    Candidate,
    Score,
    check_devices,
    headroom,
    misses,
    report_aggregate,
)
from launcher.planning.gpu_sets import gpu_subsets, left_out_suffix, not_needed, usable_gpus
from launcher.planning.memory_llamacpp import (
    DEVICE_OVERHEAD,
    LlamaCppSettings,
    compute_bytes,
    kv_bytes_per_layer,
    memory_by_device,
    pipeline_copies_bytes,
    pipeline_parallel,
)
from launcher.planning.placement import split_units


def place_llamacpp(
    cand: Candidate,
    shape: ModelShape,
    settings: LlamaCppSettings,
    budgets: Budgets,
    *,
    allow_offload: bool,
    score: Score,
) -> None:
    """Full offload on the fastest subset that fits (fewest cards, most headroom on a tie);
    then, if allowed, fewer layers on every usable GPU; then the CPU alone."""
    cand.host_budget = budgets.host
    usable, left_out = usable_gpus(
        budgets.gpus, lambda g: _fixed(shape, settings, g, 1), _smallest_unit(shape, settings),
        budgets.reserve_mib,
    )  # fmt: skip
    if _best_full(cand, shape, settings, budgets, usable, score):
        cand.excluded = not_needed(budgets.gpus, cand.gpu_devices, left_out)
        return
    if allow_offload and _partial(cand, shape, settings, budgets, usable):
        cand.excluded = not_needed(budgets.gpus, cand.gpu_devices, left_out)
        return
    if not budgets.gpus or allow_offload:
        _apply(cand, shape, settings, [], 0, [])
        cand.offload, cand.excluded = "cpu", dict(left_out)
        check_devices(cand, budgets)
        return
    _report_miss(cand, shape, settings, budgets, usable, left_out)


def _best_full(cand, shape, settings, budgets: Budgets, usable, score: Score) -> bool:
    k = shape.arch.n_layer + 1
    best, best_key = None, None
    for subset in gpu_subsets(usable, lambda g: (g.budget,)):
        split = _split(shape, settings, list(subset), k)
        if split is None:
            continue
        gpus, host = memory_by_device(
            shape, settings, gpus=[g.device for g in subset], n_gpu_layers=k, tensor_split=split
        )
        if misses(gpus, list(subset), host, budgets):
            continue
        key = (score(gpus, host), -len(subset), headroom(gpus, list(subset)))
        if best_key is None or key > best_key:
            best, best_key = (subset, split), key
    if best is None:
        return False
    _apply(cand, shape, settings, list(best[0]), k, best[1])
    cand.offload = "full"
    check_devices(cand, budgets)
    return True


def _partial(cand, shape, settings, budgets: Budgets, usable: list[DeviceBudget]) -> bool:
    """The most layers every usable GPU together holds (the rest run on the CPU)."""
    for k in range(shape.arch.n_layer, 0, -1) if usable else ():
        split = _split(shape, settings, usable, k)
        if split is None:
            continue
        _apply(cand, shape, settings, usable, k, split)
        cand.offload = "partial"
        check_devices(cand, budgets)
        if cand.fits:
            return True
    return False


def _apply(cand, shape, settings, gpus: list[DeviceBudget], k: int, split: list[float]) -> None:
    cand.gpus, cand.host = memory_by_device(
        shape, settings, gpus=[g.device for g in gpus], n_gpu_layers=k, tensor_split=split
    )
    cand.gpu_devices, cand.n_gpu_layers, cand.tensor_split = list(gpus), k, split


def _fixed(shape, settings, gpu: DeviceBudget, n_devices: int, k: int = 0) -> int:
    """What a card holds before any layer: runtime context and compute buffer (with the
    pipeline copies when llama.cpp will pipeline the split)."""
    compute = compute_bytes(shape, settings)
    if pipeline_parallel(n_devices, k, shape.arch.n_layer):
        compute += pipeline_copies_bytes(shape, settings)
    return DEVICE_OVERHEAD[gpu.kind] + compute


def _smallest_unit(shape: ModelShape, settings) -> int:
    return min(shape.layout.layers, default=0) + kv_bytes_per_layer(shape, settings)


def _split(shape, settings, gpus: list[DeviceBudget], k: int) -> list[float] | None:
    """Layer counts per GPU for the last k units (blocks, then the output layer)."""
    n_layer = shape.arch.n_layer
    kv = kv_bytes_per_layer(shape, settings)
    units = [shape.layout.layers[i] + kv for i in range(max(n_layer - k, 0), n_layer)]
    if k > n_layer:
        units.append(shape.layout.output)
    caps = [g.budget - _fixed(shape, settings, g, len(gpus), k) for g in gpus]
    counts = split_units(units, caps)
    return None if counts is None else [float(c) for c in counts]


def _report_miss(cand, shape, settings, budgets: Budgets, usable, left_out) -> None:
    """Nothing placed: the full-offload need on the usable cards, split as llama.cpp's
    default would (by free memory), and why each other card was left out."""
    tried = usable or list(budgets.gpus)
    weights = [float(g.budget) or 1.0 for g in tried]
    _apply(cand, shape, settings, tried, shape.arch.n_layer + 1, weights)
    cand.offload = "full"
    check_devices(cand, budgets)
    if cand.fits or len(tried) > 1:
        report_aggregate(cand, budgets)
    cand.excluded = dict(left_out)
    cand.reason += left_out_suffix(budgets, left_out)
