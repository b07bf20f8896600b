"""Placing a GPTQ model for exllamav2: NVIDIA GPUs only, every layer on a GPU (exllamav2 has
no CPU path), on the fastest subset of the usable cards that holds it."""

from __future__ import annotations

from launcher.planning import memory_exllamav2 as exl
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
from launcher.planning.placement import split_units


def place_exllamav2(
    cand: Candidate, spec, variant, settings: exl.ExllamaSettings, budgets: Budgets, score: Score
) -> None:
    arch, emb = spec.architecture, spec.gptq.embedding_bytes
    cuda = [g for g in budgets.gpus if g.kind == "cuda"]
    cand.host_budget, cand.n_gpu_layers = budgets.host, arch.n_layer
    usable, left_out = usable_gpus(
        tuple(cuda), lambda g: _fixed(arch, variant, emb, settings, first=True),
        _per_layer(arch, variant, emb, settings), budgets.reserve_mib,
    )  # fmt: skip
    best, best_key = None, None
    for subset in gpu_subsets(usable, lambda g: (g.budget,)):
        counts = _split(arch, variant, emb, settings, list(subset))
        if counts is None:
            continue
        gpus, host = _memory(arch, variant, emb, settings, list(subset), counts)
        if misses(gpus, list(subset), host, budgets):
            continue
        key = (score(gpus, host), -len(subset), headroom(gpus, list(subset)))
        if best_key is None or key > best_key:
            best, best_key = (list(subset), counts), key
    if best is not None:
        _apply(cand, arch, variant, emb, settings, *best)
        check_devices(cand, budgets)
        cand.excluded = not_needed(budgets.gpus, cand.gpu_devices, left_out)
        return
    tried = usable or cuda
    _apply(cand, arch, variant, emb, settings, tried, _even(arch.n_layer, tried))
    check_devices(cand, budgets)
    if len(tried) > 1:
        report_aggregate(cand, budgets)
    cand.excluded = dict(left_out)
    cand.reason += left_out_suffix(budgets, left_out)


def _per_layer(arch, variant, emb, settings) -> int:
    cache = exl.cache_bytes_per_token_layer(arch, settings.cache_mode) * settings.max_seq_len
    return exl.layer_weight_bytes(arch, variant, emb) + cache


def _fixed(arch, variant, emb, settings, *, first: bool) -> int:
    """A card's need before its layers: torch context, reserve, scratch, quantized-cache temp."""
    probe, _ = exl.memory_by_device(arch, variant, emb, settings, [1, 1])
    dev = probe[0 if first else 1]
    return dev.total - dev.weights - dev.kv_cache + exl.quant_temp_bytes(arch, settings)


def _split(arch, variant, emb, settings, gpus: list[DeviceBudget]) -> list[int] | None:
    units = [_per_layer(arch, variant, emb, settings)] * arch.n_layer
    caps = [
        g.budget - _fixed(arch, variant, emb, settings, first=i == 0) for i, g in enumerate(gpus)
    ]
    caps[-1] -= emb  # lm_head sits with the last layers
    return split_units(units, caps)


def _memory(arch, variant, emb, settings, gpus: list[DeviceBudget], counts: list[int]):
    return exl.memory_by_device(arch, variant, emb, settings, counts, [g.device for g in gpus])


def _apply(cand, arch, variant, emb, settings, gpus: list[DeviceBudget], counts) -> None:
    cand.gpus, cand.host = _memory(arch, variant, emb, settings, gpus, counts)
    cand.gpu_devices = list(gpus)
    # exllamav2's gpu_split: GiB per device for weights plus that device's scratch buffers
    cand.tensor_split = [round((d.weights + d.compute) / 2**30 + 0.05, 2) for d in cand.gpus]


def _even(n: int, gpus: list[DeviceBudget]) -> list[int]:
    """A split proportional to the budgets, for reporting a miss when no split fits."""
    total = sum(g.budget for g in gpus) or 1
    counts = [n * g.budget // total for g in gpus]
    counts[-1] += n - sum(counts)
    return counts
