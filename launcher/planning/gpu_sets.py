"""Which GPUs a candidate may use: cards too small to matter are left out, the rest are
tried in subsets.

A card whose budget cannot hold its runtime context, one compute buffer and one layer would
only cost memory (llama.cpp charges a context on every GPU it sees), so it is left out and
charged nothing; the launch then hides it from the backend. Of the remaining cards every
subset is a placement to try; subsets made of alike cards (same model, same budget) are
tried once, and past MAX_SUBSETS distinct subsets only the prefixes of the cards ordered
fastest and largest first are tried.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from itertools import product
from math import prod

from launcher.planning.budget import DeviceBudget
from launcher.units import MIB

MAX_SUBSETS = 256


def usable_gpus(
    gpus: tuple[DeviceBudget, ...],
    fixed: Callable[[DeviceBudget], int],
    smallest_layer: int,
    reserve_mib: int,
) -> tuple[list[DeviceBudget], dict[str, str]]:
    """(cards that can hold a layer, {left-out card: why}); `fixed(card)` is what a card
    holds before any layer: runtime context plus compute buffer."""
    usable, left_out = [], {}
    for gpu in gpus:
        floor = fixed(gpu) + smallest_layer
        if gpu.budget >= floor:
            usable.append(gpu)
            continue
        left_out[gpu.device] = (
            f"{gpu.device} left out: {gpu.free_mib} MiB free, {gpu.budget // MIB} MiB after "
            f"the {reserve_mib} MiB reserve, below the {-(-floor // MIB)} MiB that its "
            "runtime context, compute buffer and one layer need"
        )
    return usable, left_out


def gpu_subsets(
    gpus: list[DeviceBudget], preference: Callable[[DeviceBudget], tuple]
) -> Iterator[tuple[DeviceBudget, ...]]:
    """Non-empty subsets in device order, fewest cards first, one per distinct set of cards
    (cards alike in kind, name and budget are interchangeable)."""
    groups: dict[tuple, list[DeviceBudget]] = {}
    for gpu in gpus:
        groups.setdefault((gpu.kind, gpu.name, gpu.budget), []).append(gpu)
    members = list(groups.values())
    if prod(len(m) + 1 for m in members) - 1 > MAX_SUBSETS:
        ranked = sorted(gpus, key=preference, reverse=True)
        for n in range(1, len(ranked) + 1):
            yield tuple(sorted(ranked[:n], key=gpus.index))
        return
    counts = product(*(range(len(m) + 1) for m in members))
    for combo in sorted((c for c in counts if any(c)), key=sum):
        chosen = [g for m, n in zip(members, combo) for g in m[:n]]
        yield tuple(sorted(chosen, key=gpus.index))


def not_needed(all_gpus, chosen, left_out: dict[str, str]) -> dict[str, str]:
    """The left-out reasons plus, for usable cards the placement did not take, why not."""
    used = {g.device for g in chosen}
    out = dict(left_out)
    for gpu in all_gpus:
        if gpu.device not in used and gpu.device not in out:
            names = "+".join(sorted(used)) or "the CPU"
            out[gpu.device] = f"{gpu.device} not needed: the model runs best on {names}"
    return out


def left_out_suffix(budgets, left_out: dict[str, str]) -> str:
    """'; cuda:1 left out (600 MiB free)': the short form a rejected candidate's reason ends
    with (the plan's placement.left_out has the whole reason)."""
    short = [
        f"{g.device} left out ({g.free_mib} MiB free)" for g in budgets.gpus if g.device in left_out
    ]
    return "".join(f"; {s}" for s in short)
