"""What llmup's llama.cpp worker adds to llama-cpp-python's OpenAI server.

Applied by `launcher.workers.llamacpp_python.server` inside the backend process only, before the
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
- **The last context tokens stay free.** llama-cpp-python keeps generating past `max_tokens`
  while it completes a UTF-8 character (up to 3 byte tokens), and a reply that reaches
  position n_ctx fails with "llama_decode returned 1" (seen in 4 of 96 requests that filled
  the context exactly, none with one token free). The Llama's own idea of its context
  (`_n_ctx`, which its prompt check and its "rest of the context" default for a request
  without max_tokens read) is `UTF8_HOLDBACK_TOKENS` short of the real one.
- **`GET /llmup/meta`**: the model's vocabulary size and context, so the proxy can check
  `logit_bias` token ids (llama-cpp-python indexes its logits with them unchecked), and the
  build's identity (llama-cpp-python's version, the model file, its settings) for the
  replies' `system_fingerprint`.
- **`POST /llmup/prompt-tokens`**: a request's prompt counted by llama-cpp-python's own code:
  the chat handler renders it and `_create_completion` tokenizes it exactly as for the
  request, on a stand-in (`_DryRun`) whose generation stops before evaluating anything.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import llama_cpp
import llama_cpp.server.app as server_app
from fastapi import HTTPException
from llama_cpp import Llama
from llama_cpp._internals import LlamaSampler

from launcher import __version__
from launcher.protocol import META_PATH, PROMPT_TOKENS_PATH, PromptTokens

# Tokens kept free at the end of the context (see the module's doc).
UTF8_HOLDBACK_TOKENS = 3
# The chat fields that shape a rendered prompt (the rest act after tokenizing).
TEMPLATE_FIELDS = (
    "messages", "functions", "function_call", "tools", "tool_choice", "response_format",
)  # fmt: skip


def apply() -> None:
    """Install every patch (idempotent)."""
    if getattr(Llama, "_llmup_patched", False):
        return
    Llama._llmup_patched = True
    _count_generated_tokens()
    _stream_usage()
    LlamaSampler.add_grammar = _checked_add_grammar
    _add_llmup_routes()


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


def _add_llmup_routes() -> None:
    original = server_app.create_app

    def create_app(*args: Any, **kwargs: Any) -> Any:
        app = original(*args, **kwargs)
        proxy = server_app._llama_proxy
        llama = proxy._current_model
        llama._n_ctx = llama.n_ctx() - UTF8_HOLDBACK_TOKENS
        meta = {
            "n_vocab": llama.n_vocab(),
            "n_ctx": llama.n_ctx(),
            "stream_usage": True,
            "identity": identity(proxy._default_model_settings.model_dump(mode="json")),
        }
        app.add_api_route(META_PATH, lambda: meta, methods=["GET"])
        app.add_api_route(PROMPT_TOKENS_PATH, _prompt_route(llama), methods=["POST"])
        return app

    server_app.create_app = create_app


def identity(settings: dict[str, Any]) -> dict[str, Any]:
    """What identifies this worker's build: llama-cpp-python's version, the model file (path,
    size, mtime) and every model setting it was started with but the ones that only name
    or log it."""
    path = Path(settings["model"])
    stat = path.stat()
    kept = {k: v for k, v in settings.items() if k not in ("model_alias", "verbose")}
    return {
        "backend": "llama-cpp-python-server",
        "llmup": __version__,
        "llama_cpp": llama_cpp.__version__,
        "model_size": stat.st_size,
        "model_mtime_ns": stat.st_mtime_ns,
        "settings": kept,
    }


def _prompt_route(llama: Llama) -> Any:
    def prompt_tokens(body: dict[str, Any]) -> PromptTokens:
        """Runs in the threadpool, beside a generation: it only renders and tokenizes."""
        try:
            return count_prompt(llama, body)
        except (ValueError, TypeError, KeyError) as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from exc

    return prompt_tokens


def count_prompt(llama: Llama, body: dict[str, Any]) -> PromptTokens:
    """A chat or completion request's prompt tokens, as llama-cpp-python would evaluate them."""
    dry = _DryRun(llama)
    context = llama.n_ctx() - UTF8_HOLDBACK_TOKENS
    try:
        if "messages" in body:
            fields = {k: body[k] for k in TEMPLATE_FIELDS if body.get(k) is not None}
            Llama.create_chat_completion(dry, **fields, max_tokens=1)
        else:
            Llama.create_completion(dry, prompt=body["prompt"], max_tokens=1)
    except _Counted as counted:
        messages = body.get("messages")
        per_message = [_content_tokens(llama, m) for m in messages] if messages else None
        return PromptTokens(
            prompt_tokens=counted.tokens, context=context, message_tokens=per_message
        )
    raise ValueError("llama-cpp-python returned without evaluating the prompt")


def _content_tokens(llama: Llama, message: dict[str, Any]) -> int:
    """A message's content (and tool calls) in tokens, without the template's markers."""
    content = message.get("content") or ""
    if isinstance(content, list):
        content = "".join(str(part.get("text", "")) for part in content)
    calls = [c.get("function") or {} for c in message.get("tool_calls") or []]
    parts = [content, *(f"{c.get('name', '')}\n{c.get('arguments', '')}" for c in calls)]
    text = "\n".join(p for p in parts if p)
    return len(llama.tokenize(text.encode("utf-8"), add_bos=False, special=False)) if text else 0


class _Counted(Exception):
    def __init__(self, tokens: int) -> None:
        super().__init__(tokens)
        self.tokens = tokens


class _DryRun:
    """The loaded Llama as a request's code sees it, except that nothing is evaluated: the
    chat handler and `_create_completion` (llama-cpp-python's own, called with this object as
    `self`) render and tokenize the prompt as for a request, then `generate` reports its
    length. No context limit applies, so a prompt too long is counted too; the seed and the
    prompt cache of the real Llama are left alone (a generation may be running)."""

    create_completion = Llama.create_completion
    _create_completion = Llama._create_completion
    cache = None
    verbose = False

    def __init__(self, llama: Llama) -> None:
        self._llama = llama
        self._n_ctx = 1 << 30

    def __getattr__(self, name: str) -> Any:
        return getattr(self._llama, name)

    def set_seed(self, seed: int) -> None:
        """The request's seed matters only to a generation."""

    def generate(self, tokens: Any, *args: Any, **kwargs: Any) -> Iterator[int]:
        raise _Counted(len(tokens))
