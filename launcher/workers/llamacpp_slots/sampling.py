"""One llama_sampler chain per request: logit bias, penalties, grammar, then the pick.

The order follows llama.cpp's own server: biases and penalties change the logits, a grammar
masks what may not come next, and the last link picks a token (greedy at temperature 0, else
top-k, top-p, min-p, temperature and a seeded draw, or temperature and mirostat).
`llama_sampler_sample` also accepts the picked token, so grammar and penalty state advance
with the reply. A grammar with triggers is llama.cpp's lazy grammar: it lets every token
through until the reply so far matches a trigger, then constrains from the match on (a tool
call that may or may not come). The n choices of one request each get their own chain,
seeded seed + choice.

A grammar is applied the way llama.cpp's own sampler does it (common/sampling.cpp): the
token is picked without it, then checked against it alone, and only when the grammar
refuses it is the pick made again with the grammar masking the whole vocabulary first.
Masking costs a pass of the grammar over every token of the vocabulary (46 ms a token on
Gemma's 262,144 here); a model following its format mostly picks a token the grammar allows.
"""

from __future__ import annotations

import ctypes
import logging
from typing import Any

import llama_cpp.llama_cpp as lib
import numpy as np

from launcher.workers.generation import GenerationParams
from launcher.workers.llamacpp_slots.native import NativeContext, NativeModel

PENALTY_LAST_N = 64  # tokens the presence/frequency penalties look back over
RANDOM_SEED = 0xFFFFFFFF  # LLAMA_DEFAULT_SEED: llama.cpp draws a random seed
MIROSTAT_M = 100  # llama.cpp's common sampler uses the same for mirostat 1
log = logging.getLogger(__name__)

TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])  # llama_token_data


class GrammarError(ValueError):
    """The grammar is not one llama.cpp can parse."""


def check_grammar(model: NativeModel, grammar: str) -> bool:
    """Whether llama.cpp parses `grammar` (it only reads the vocabulary: any thread)."""
    sampler = lib.llama_sampler_init_grammar(model.vocab, grammar.encode("utf-8"), b"root")
    if not sampler:
        return False
    lib.llama_sampler_free(sampler)
    return True


def grammar_sampler(model: NativeModel, grammar: str, triggers: tuple[str, ...] = ()) -> Any:
    """A grammar sampler, lazy when `triggers` are given; NULL when the grammar does not parse."""
    text = grammar.encode("utf-8")
    if not triggers:
        return lib.llama_sampler_init_grammar(model.vocab, text, b"root")
    patterns = (ctypes.c_char_p * len(triggers))(*(t.encode("utf-8") for t in triggers))
    return lib.llama_sampler_init_grammar_lazy_patterns(
        model.vocab, text, b"root", patterns, len(triggers), None, 0
    )


class _Candidates:
    """llama_token_data arrays in numpy buffers: the whole vocabulary from a row of logits,
    or one token."""

    def __init__(self, n_vocab: int) -> None:
        self.ids = np.arange(n_vocab, dtype=np.int32)
        self.all = np.zeros(n_vocab, dtype=TOKEN_DATA)
        self.one = np.zeros(1, dtype=TOKEN_DATA)

    def vocabulary(self, logits: np.ndarray) -> Any:
        self.all["id"], self.all["logit"], self.all["p"] = self.ids, logits, 0.0
        return _array(self.all)

    def token(self, token: int) -> Any:
        self.one["id"], self.one["logit"], self.one["p"] = token, 1.0, 0.0
        return _array(self.one)


def _array(buffer: np.ndarray) -> Any:
    data = buffer.ctypes.data_as(lib.llama_token_data_p)
    return lib.llama_token_data_array(data, len(buffer), -1, False)


class SamplerChain:
    """A request's sampler; `close` frees it (the engine does when the request ends)."""

    def __init__(self, model: NativeModel, params: GenerationParams, *, choice: int = 0) -> None:
        self.ptr = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        self.seed = RANDOM_SEED if params.seed is None else (params.seed + choice) & 0xFFFFFFFF
        self.grammar: Any = None  # kept out of the chain: checked first, masked when it must
        self.n_vocab = model.vocab_size
        self.end = model.eos
        self._candidates: _Candidates | None = None
        try:
            self._build(model, params)
        except BaseException:
            self.close()
            raise

    def _add(self, sampler: Any) -> None:
        lib.llama_sampler_chain_add(self.ptr, sampler)

    def _build(self, model: NativeModel, params: GenerationParams) -> None:
        if params.logit_bias:
            biases = (lib.llama_logit_bias * len(params.logit_bias))()
            for i, (token, bias) in enumerate(params.logit_bias.items()):
                biases[i].token, biases[i].bias = token, bias
            self._add(
                lib.llama_sampler_init_logit_bias(model.vocab_size, len(params.logit_bias), biases)
            )
        if params.presence_penalty or params.frequency_penalty or params.repeat_penalty != 1:
            self._add(
                lib.llama_sampler_init_penalties(
                    model.vocab_size,
                    PENALTY_LAST_N,
                    params.repeat_penalty,
                    params.frequency_penalty,
                    params.presence_penalty,
                )
            )
        if params.grammar is not None:
            grammar = grammar_sampler(model, params.grammar, params.grammar_triggers)
            if not grammar:
                raise GrammarError("the grammar does not parse (llama.cpp logged where)")
            self.grammar = grammar
            self._candidates = _Candidates(model.vocab_size)
        self._add_pick(model, params)

    def _add_pick(self, model: NativeModel, params: GenerationParams) -> None:
        if params.temperature <= 0:
            self._add(lib.llama_sampler_init_greedy())
            return
        if params.mirostat:
            self._add(lib.llama_sampler_init_temp(params.temperature))
            tau, eta = params.mirostat_tau, params.mirostat_eta
            if params.mirostat == 1:
                pick = lib.llama_sampler_init_mirostat(
                    model.vocab_size, self.seed, tau, eta, MIROSTAT_M
                )
            else:
                pick = lib.llama_sampler_init_mirostat_v2(self.seed, tau, eta)
            self._add(pick)
            return
        if params.top_k > 0:
            self._add(lib.llama_sampler_init_top_k(params.top_k))
        if params.top_p < 1.0:
            self._add(lib.llama_sampler_init_top_p(params.top_p, 1))
        if params.min_p > 0:
            self._add(lib.llama_sampler_init_min_p(params.min_p, 1))
        self._add(lib.llama_sampler_init_temp(params.temperature))
        self._add(lib.llama_sampler_init_dist(self.seed))

    def sample(self, ctx: NativeContext, row: int) -> int:
        """Pick (and accept) the next token from the logits of batch row `row`."""
        if self.grammar is None:
            return lib.llama_sampler_sample(self.ptr, ctx.ptr, row)
        candidates = self._candidates
        assert candidates is not None
        pointer = lib.llama_get_logits_ith(ctx.ptr, row)
        logits = np.ctypeslib.as_array(pointer, shape=(self.n_vocab,))
        token = self._pick(candidates.vocabulary(logits))
        if not self._allowed(token):
            everything = candidates.vocabulary(logits)
            lib.llama_sampler_apply(self.grammar, ctypes.byref(everything))
            token = self._pick(everything)
            if not self._allowed(token):
                return self._dead_end()
        lib.llama_sampler_accept(self.grammar, token)
        lib.llama_sampler_accept(self.ptr, token)
        return token

    def _dead_end(self) -> int:
        """The end of the reply when no token the grammar allows survives the chain (e.g. a
        finished grammar allows only the end, which `min_tokens` holds off, or biases remove
        every allowed token): the pick is then any masked token, and accepting it would make
        llama.cpp's grammar throw through ctypes and abort the worker."""
        log.warning("no token the grammar allows is left to pick: the reply ends here")
        return self.end

    def _pick(self, candidates: Any) -> int:
        lib.llama_sampler_apply(self.ptr, ctypes.byref(candidates))
        return int(candidates.data[candidates.selected].id)

    def _allowed(self, token: int) -> bool:
        assert self._candidates is not None
        one = self._candidates.token(token)
        lib.llama_sampler_apply(self.grammar, ctypes.byref(one))
        return bool(np.isfinite(self._candidates.one["logit"][0]))

    def close(self) -> None:
        if self.ptr:
            lib.llama_sampler_free(self.ptr)
            self.ptr = None
        if self.grammar:
            lib.llama_sampler_free(self.grammar)
            self.grammar = None
