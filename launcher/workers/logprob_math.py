"""A token's log probability and the most likely alternatives, from one row of logits.

Both workers read their engine's logits into a numpy row (llama.cpp's `llama_get_logits_ith`,
exllamav2's `return_logits`) and call `token_logprob`: the log-softmax at the sampled token
and at the `top` largest logits, computed in float64 so a 256k-token vocabulary sums
without loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from launcher.workers.generation import TokenLogprob, TopLogprob

TokenText = Callable[[int], tuple[str, tuple[int, ...]]]  # id -> (text, UTF-8 bytes)


def token_logprob(logits: np.ndarray, token: int, top: int, text: TokenText) -> TokenLogprob:
    """The sampled `token`'s log probability under `logits`, with the `top` most likely."""
    row = logits.astype(np.float64)
    peak = float(row.max())
    norm = peak + math.log(float(np.exp(row - peak).sum()))
    alternatives: tuple[TopLogprob, ...] = ()
    if top > 0:
        best = np.argpartition(-row, min(top, row.size) - 1)[:top]
        best = best[np.argsort(-row[best], kind="stable")]
        alternatives = tuple(TopLogprob(*text(int(i)), float(row[i]) - norm) for i in best)
    return TokenLogprob(*text(token), float(row[token]) - norm, alternatives)
