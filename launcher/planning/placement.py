"""Placing whole layers on devices: contiguous runs, in device order, as both backends do."""

from __future__ import annotations


def split_units(costs: list[int], capacities: list[int]) -> list[int] | None:
    """How many consecutive units each device takes, or None when they cannot fit.

    Shares follow each device's capacity (as llama.cpp's default split follows free
    memory) so no card runs fuller than the others; if rounding makes that infeasible,
    the greedy fill (each device as full as it can be, in order) is tried, which finds
    a contiguous split whenever one exists.
    """
    if not costs:
        return [0] * len(capacities)
    usable = [max(c, 0) for c in capacities]
    if sum(costs) > sum(usable):
        return None
    proportional = _proportional(costs, usable)
    if _fits(costs, usable, proportional):
        return proportional
    greedy = _greedy(costs, usable)
    return greedy if greedy is not None and _fits(costs, usable, greedy) else None


def _proportional(costs: list[int], usable: list[int]) -> list[int]:
    total_cap = sum(usable) or 1
    total = sum(costs)
    counts, device, acc = [0] * len(usable), 0, 0
    boundary = total * usable[0] / total_cap
    for cost in costs:
        while device < len(usable) - 1 and acc + cost / 2 > boundary:
            device += 1
            boundary += total * usable[device] / total_cap
        counts[device] += 1
        acc += cost
    return counts


def _greedy(costs: list[int], usable: list[int]) -> list[int] | None:
    counts, device, load = [0] * len(usable), 0, 0
    for cost in costs:
        while load + cost > usable[device]:
            device, load = device + 1, 0
            if device == len(usable):
                return None
        counts[device] += 1
        load += cost
    return counts


def _fits(costs: list[int], usable: list[int], counts: list[int]) -> bool:
    start = 0
    for cap, count in zip(usable, counts):
        if sum(costs[start : start + count]) > cap:
            return False
        start += count
    return True
