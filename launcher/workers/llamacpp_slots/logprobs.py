"""Log probabilities from the logits llama.cpp already computed, read only when asked.

After each decode the context holds the logits of every row that asked for them
(`llama_get_logits_ith`); a request with `logprobs` gets, for each token it samples, the
log-softmax of that row at the token and its `top` most likely alternatives. Nothing is
computed for requests that do not ask: the cost (one pass over the vocabulary, about a
millisecond for 256k tokens) stays with the requests that want it.

The same rows are where `min_tokens` holds off the end of a reply: the end-of-generation
tokens' logits are set to -inf in place before the request's sampler reads them. The
log probabilities are then those of the distribution the token was drawn from (the model's,
less the ended-too-early tokens); logit_bias, penalties and grammars act on the sampler's
own copy and do not change them.
"""

from __future__ import annotations

import llama_cpp.llama_cpp as lib
import numpy as np

from launcher.workers.generation import TokenLogprob
from launcher.workers.llamacpp_slots.native import NativeContext, NativeModel
from launcher.workers.logprob_math import token_logprob


class LogitReader:
    """Per model: token texts cached, the end-of-generation ids found once when needed."""

    def __init__(self, model: NativeModel) -> None:
        self.model = model
        self._texts: dict[int, tuple[str, tuple[int, ...]]] = {}
        self._ends: np.ndarray | None = None

    def _row(self, ctx: NativeContext, row: int) -> np.ndarray:
        pointer = lib.llama_get_logits_ith(ctx.ptr, row)
        return np.ctypeslib.as_array(pointer, shape=(self.model.vocab_size,))

    def token(self, token: int) -> tuple[str, tuple[int, ...]]:
        """A token's text (bytes that are not UTF-8 on their own as U+FFFD) and bytes."""
        cached = self._texts.get(token)
        if cached is None:
            piece = self.model.piece(token)
            cached = (piece.decode("utf-8", errors="replace"), tuple(piece))
            self._texts[token] = cached
        return cached

    def logprob(self, ctx: NativeContext, row: int, token: int, top: int) -> TokenLogprob:
        """The sampled `token`'s log probability at `row`, with the `top` most likely."""
        return token_logprob(self._row(ctx, row), token, top, self.token)

    def hold_off_end(self, ctx: NativeContext, row: int) -> None:
        """No end-of-generation token may be picked from `row` (min_tokens)."""
        if self._ends is None:
            ids = [t for t in range(self.model.vocab_size) if self.model.is_end(t)]
            self._ends = np.array(ids, dtype=np.int64)
        self._row(ctx, row)[self._ends] = -np.inf
