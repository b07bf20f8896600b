"""Integers within bounds as a GBNF expression: the `minimum` / `maximum` (and exclusive)
of a JSON schema's integer, which llama-cpp-python's copy of llama.cpp's schema converter
ignores.

A range is split by sign, then by number of digits; a run of numbers of one length is
written digit by digit (a shared first digit, or the first digit's own range followed by
the rest's). Numbers never start with 0 (except 0 itself), as JSON's grammar says, and have
at most `MAX_DIGITS` digits, the converter's own limit for an unbounded integer.
"""

from __future__ import annotations

MAX_DIGITS = 16
LARGEST = 10**MAX_DIGITS - 1


def integer_range(low: int | None, high: int | None) -> str | None:
    """A GBNF expression for the integers in [low, high] (None: unbounded); None when the
    range is empty."""
    low = -LARGEST if low is None else max(low, -LARGEST)
    high = LARGEST if high is None else min(high, LARGEST)
    if low > high:
        return None
    parts = []
    if low < 0:
        negative = _naturals(max(1, -high), -low)
        parts.append(f'"-" ( {" | ".join(negative)} )')
    if high >= 0:
        parts += _naturals(max(0, low), high)
    return "( " + " | ".join(parts) + " )"


def _naturals(low: int, high: int) -> list[str]:
    """Alternatives for the numbers in [low, high], both >= 0, low <= high."""
    out = []
    for digits in range(len(str(low)), len(str(high)) + 1):
        first = max(low, 10 ** (digits - 1) if digits > 1 else 0)
        last = min(high, 10**digits - 1)
        if first <= last:
            out += _same_length(str(first), str(last))
    return out


def _same_length(low: str, high: str) -> list[str]:
    """Alternatives for the numbers between two of the same length (low <= high)."""
    tail = len(low) - 1
    if low[1:] == "0" * tail and high[1:] == "9" * tail:  # every number of the first digits
        return [f"[{low[0]}-{high[0]}]" + " [0-9]" * tail]
    if low[0] == high[0]:
        rest = " | ".join(_same_length(low[1:], high[1:]))
        return [f'"{low[0]}" ( {rest} )']
    out = [f'"{low[0]}" ( {" | ".join(_same_length(low[1:], "9" * tail))} )']
    if int(high[0]) - int(low[0]) > 1:
        out.append(f"[{int(low[0]) + 1}-{int(high[0]) - 1}]" + " [0-9]" * tail)
    out.append(f'"{high[0]}" ( {" | ".join(_same_length("0" * tail, high[1:]))} )')
    return out


def bounds(schema: dict) -> tuple[int | None, int | None] | None:
    """An integer schema's inclusive bounds; None when it has none."""
    low, high = schema.get("minimum"), schema.get("maximum")
    above, below = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
    if all(v is None for v in (low, high, above, below)):
        return None
    lows = [_ceil(low)] if _number(low) else []
    lows += [_floor(above) + 1] if _number(above) else []
    highs = [_floor(high)] if _number(high) else []
    highs += [_ceil(below) - 1] if _number(below) else []
    return (max(lows) if lows else None, min(highs) if highs else None)


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _floor(value: float) -> int:
    return int(value // 1)


def _ceil(value: float) -> int:
    return -int(-value // 1)
