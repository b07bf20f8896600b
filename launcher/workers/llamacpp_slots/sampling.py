"""One llama_sampler chain per request: logit bias, penalties, grammar, then the pick.

The order follows llama.cpp's own server: biases and penalties change the logits, a grammar
masks what may not come next, and the last link picks a token (greedy at temperature 0, else
top-k, top-p, min-p, temperature and a seeded draw). `llama_sampler_sample` also accepts the
picked token, so grammar and penalty state advance with the reply. JSON mode is a grammar:
llama-cpp-python's JSON grammar, or one converted from the request's JSON schema.
"""

from __future__ import annotations

import json
from typing import Any

import llama_cpp.llama_cpp as lib
from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

from launcher.workers.generation import GenerationParams
from launcher.workers.llamacpp_slots.native import NativeContext, NativeModel

PENALTY_LAST_N = 64  # tokens the presence/frequency penalties look back over
RANDOM_SEED = 0xFFFFFFFF  # LLAMA_DEFAULT_SEED: llama.cpp draws a random seed


class GrammarError(ValueError):
    """The grammar (or the JSON schema it came from) is not one llama.cpp can parse."""


def json_mode_grammar(kind: str, schema: dict[str, Any] | None) -> str | None:
    """The grammar for `response_format`: None for text; for json_object (and json_schema)
    any JSON, or JSON of `schema` when given (llama-cpp-python's `response_format.schema`)."""
    if kind == "text":
        return None
    if kind not in ("json_object", "json_schema"):
        raise GrammarError(f"response_format type {kind!r} is not supported")
    if schema is None:
        if kind == "json_schema":
            raise GrammarError("response_format json_schema needs its schema under `schema`")
        return JSON_GBNF
    try:
        return json_schema_to_gbnf(json.dumps(schema))
    except Exception as exc:  # the converter raises bare Exceptions and KeyErrors
        raise GrammarError(f"cannot turn the JSON schema into a grammar: {exc}") from exc


def check_grammar(model: NativeModel, grammar: str) -> bool:
    """Whether llama.cpp parses `grammar` (it only reads the vocabulary: any thread)."""
    sampler = lib.llama_sampler_init_grammar(model.vocab, grammar.encode("utf-8"), b"root")
    if not sampler:
        return False
    lib.llama_sampler_free(sampler)
    return True


class SamplerChain:
    """A request's sampler; `close` frees it (the engine does when the request ends)."""

    def __init__(self, model: NativeModel, params: GenerationParams) -> None:
        self.ptr = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
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
                    PENALTY_LAST_N,
                    params.repeat_penalty,
                    params.frequency_penalty,
                    params.presence_penalty,
                )
            )
        if params.grammar is not None:
            grammar = lib.llama_sampler_init_grammar(
                model.vocab, params.grammar.encode("utf-8"), b"root"
            )
            if not grammar:
                raise GrammarError("the grammar does not parse (llama.cpp logged where)")
            self._add(grammar)
        self._add_pick(params)

    def _add_pick(self, params: GenerationParams) -> None:
        if params.temperature <= 0:
            self._add(lib.llama_sampler_init_greedy())
            return
        if params.top_k > 0:
            self._add(lib.llama_sampler_init_top_k(params.top_k))
        if params.top_p < 1.0:
            self._add(lib.llama_sampler_init_top_p(params.top_p, 1))
        if params.min_p > 0:
            self._add(lib.llama_sampler_init_min_p(params.min_p, 1))
        self._add(lib.llama_sampler_init_temp(params.temperature))
        seed = RANDOM_SEED if params.seed is None else params.seed & 0xFFFFFFFF
        self._add(lib.llama_sampler_init_dist(seed))

    def sample(self, ctx: NativeContext, row: int) -> int:
        """Pick (and accept) the next token from the logits of batch row `row`."""
        return lib.llama_sampler_sample(self.ptr, ctx.ptr, row)

    def close(self) -> None:
        if self.ptr:
            lib.llama_sampler_free(self.ptr)
            self.ptr = None
