"""What llmup's llama.cpp worker adds to llama-cpp-python's OpenAI server.

Applied by `launcher.backends.llamacpp_worker` inside the backend process only, before the
server is built:

- **Exact usage in streams.** llama_cpp.server sends no usage in a stream (it ignores
  `stream_options`), and counting chunks is wrong (one chunk may hold several tokens while
  llama.cpp completes a UTF-8 character or a possible stop string). The worker counts what
  `Llama.generate` really consumes and yields (the prompt, and every generated token but an
  end-of-generation one, as the non-streamed `usage` counts them) and ends every stream with
  an OpenAI usage chunk (`choices: []`); the proxy passes it on only to a client that asked.
- **A grammar llama.cpp cannot parse is an error, not a crash.** `llama_sampler_init_grammar`
  returns NULL for it, and llama-cpp-python adds that NULL to its sampler chain: SIGSEGV.
  The worker raises instead (the proxy parses grammars first; this is the second line).
- **`GET /llmup/meta`**: the model's vocabulary size and context, so the proxy can check
  `logit_bias` token ids (llama-cpp-python indexes its logits with them unchecked).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import llama_cpp
import llama_cpp.server.app as server_app
from llama_cpp import Llama
from llama_cpp._internals import LlamaSampler

from launcher.protocol import META_PATH


def apply() -> None:
    """Install every patch (idempotent)."""
    if getattr(Llama, "_llmup_patched", False):
        return
    Llama._llmup_patched = True
    _count_generated_tokens()
    _stream_usage()
    LlamaSampler.add_grammar = _checked_add_grammar
    _add_meta_route()


def _count_generated_tokens() -> None:
    original = Llama.generate

    def generate(self: Llama, tokens: Any, *args: Any, **kwargs: Any) -> Iterator[int]:
        usage = {"prompt_tokens": len(tokens), "completion_tokens": 0}
        self._llmup_usage = usage
        vocab = self._model.vocab
        for token in original(self, tokens, *args, **kwargs):
            if not llama_cpp.llama_vocab_is_eog(vocab, token):
                usage["completion_tokens"] += 1
            yield token

    Llama.generate = generate


def _stream_usage() -> None:
    for name in ("create_chat_completion", "create_completion"):
        setattr(Llama, name, _ending_with_usage(getattr(Llama, name)))


def _ending_with_usage(create: Any) -> Any:
    """`create` whose stream ends with a usage chunk; only the outermost call adds one
    (create_chat_completion streams through create_completion)."""

    def wrapped(self: Llama, *args: Any, **kwargs: Any) -> Any:
        if getattr(self, "_llmup_creating", False):
            return create(self, *args, **kwargs)
        self._llmup_usage = None
        self._llmup_creating = True
        try:
            result = create(self, *args, **kwargs)
        finally:
            self._llmup_creating = False
        if isinstance(result, Iterator):
            return _with_usage_chunk(self, result)
        return result

    wrapped.__doc__ = create.__doc__
    return wrapped


def _with_usage_chunk(llama: Llama, chunks: Iterator[dict]) -> Iterator[dict]:
    last = None
    for chunk in chunks:
        last = chunk
        yield chunk
    usage = llama._llmup_usage
    if last is None or usage is None:
        return
    total = usage["prompt_tokens"] + usage["completion_tokens"]
    yield {
        "id": last["id"],
        "object": last["object"],
        "created": last["created"],
        "model": last["model"],
        "choices": [],
        "usage": {**usage, "total_tokens": total},
    }


def _checked_add_grammar(self: LlamaSampler, model: Any, grammar: Any) -> None:
    sampler = llama_cpp.llama_sampler_init_grammar(
        model.vocab, grammar._grammar.encode("utf-8"), grammar._root.encode("utf-8")
    )
    if not sampler:
        raise ValueError("llama.cpp could not parse the grammar")
    llama_cpp.llama_sampler_chain_add(self.sampler, sampler)


def _add_meta_route() -> None:
    original = server_app.create_app

    def create_app(*args: Any, **kwargs: Any) -> Any:
        app = original(*args, **kwargs)
        llama = server_app._llama_proxy._current_model
        meta = {"n_vocab": llama.n_vocab(), "n_ctx": llama.n_ctx(), "stream_usage": True}
        app.add_api_route(META_PATH, lambda: meta, methods=["GET"])
        return app

    server_app.create_app = create_app
