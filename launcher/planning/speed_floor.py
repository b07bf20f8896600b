"""How fast is fast enough: `--min-tokens-per-s` passes over slower candidates, and a plan
expected to decode slower than people read says so.

The policy stays "the largest model that fits"; a plan below reading speed
(`planning.readable_tokens_per_s`, 5 tokens/s by default) carries a `SpeedWarning` naming the
exact flag that would serve something fast enough, and what that flag then serves: the
planner's own choice with that floor, not a guess beside it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from launcher.planning.candidates import Candidate
from launcher.planning.plan import FasterChoice, SpeedWarning


def by_speed(fitting: list[Candidate], floor: float | None):
    """(fast enough or of unknown speed, too slow) for --min-tokens-per-s, in rank order."""
    if not floor:
        return fitting, []
    slow = [c for c in fitting if c.decode_tps is not None and c.decode_tps < floor]
    return [c for c in fitting if c not in slow], slow


def speed_warning(
    chosen: Candidate,
    fitting: list[Candidate],
    readable: float,
    widen: Callable[[Candidate], Candidate] = lambda c: c,
) -> SpeedWarning | None:
    """None when `chosen` decodes at reading speed or its speed is unknown; otherwise what to
    say, and the candidate `--min-tokens-per-s` would serve instead (`widen` turns a
    candidate into the one that plan would carry, as the planner does)."""
    speed = chosen.decode_tps
    if speed is None or speed >= readable:
        return None
    known = [c.decode_tps for c in fitting if c.decode_tps is not None]
    floor = readable if max(known, default=0) >= readable else floor_2_digits(max(known))
    fast, _ = by_speed(fitting, floor)
    alternative = widen(fast[0]) if fast else None
    head = (
        f"expected to decode at ~{tokens(speed)} tokens/s, below reading speed "
        f"({readable:g} tokens/s, planning.readable_tokens_per_s)"
    )
    faster = _faster(alternative, floor, speed)
    if faster is None:
        message = f"{head}; nothing that fits here is faster"
    else:
        serves = (
            f"`{faster.flag}` serves {faster.model} {faster.quant} at "
            f"~{tokens(faster.decode_tokens_per_s)} tokens/s"
        )
        reach = floor == readable
        message = f"{head}: {serves}" if reach else f"{head}; the fastest that fits: {serves}"
    return SpeedWarning(
        decode_tokens_per_s=speed, readable_tokens_per_s=readable, message=message, faster=faster
    )


def _faster(candidate: Candidate | None, floor: float, speed: float) -> FasterChoice | None:
    if candidate is None or candidate.decode_tps is None or candidate.decode_tps <= speed:
        return None
    return FasterChoice(
        model=candidate.model_id,
        quant=candidate.quant,
        backend=candidate.backend,
        decode_tokens_per_s=candidate.decode_tps,
        flag=f"--min-tokens-per-s {floor:g}",
    )


def floor_2_digits(value: float) -> float:
    """`value` rounded down to two significant digits (3.27 -> 3.2): a floor that the
    candidate of that speed still passes."""
    if value <= 0:
        return 0.0
    factor = 10 ** (1 - math.floor(math.log10(value)))
    return math.floor(value * factor) / factor


def tokens(value: float) -> str:
    return f"{value:.2g}" if value < 10 else f"{value:.0f}"
