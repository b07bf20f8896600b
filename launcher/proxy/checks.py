"""What the request models cannot know: what this backend supports, and what it would
crash on. Everything here runs before a request is admitted to the backend.

- llmup's session-slot worker (the default for GGUF) takes every field the proxy accepts:
  tools and functions, JSON replies, `n` > 1, log probabilities, a reply to continue, and
  llama.cpp's own sampling fields;
- llama-cpp-python's server (`--llamacpp-impl server`) generates one choice and no log
  probabilities (it needs `logits_all`, which costs memory on every request, and answers a
  500 without it): `n` above 1 and `logprobs` are refused there;
- `grammar` and `logit_bias` are refused on exllamav2, which cannot apply them (no GBNF
  grammar, no logit bias); its worker holds JSON replies and forced tool calls to their
  schemas with its own filters, and refuses tools it may call or not and mirostat 1;
- `tool_choice` and `function_call` must name a tool or function of the request;
- `logit_bias` token ids must exist in the model's vocabulary (llama-cpp-python indexes
  its logits with them unchecked: an IndexError, a 500);
- every grammar the backend would build is parsed first (`launcher.proxy.grammar`).
"""

from __future__ import annotations

from typing import Any

from launcher.errors import BadRequestError
from launcher.served import WorkerKind

# fields a backend kind cannot honour (so a request relying on them must hear it), and
# what to run instead
UNSUPPORTED = {
    WorkerKind.EXLLAMAV2: ("grammar", "logit_bias"),
}
# n > 1 and log probabilities: llmup's own workers (llama_cpp.server: one choice, none)
MANY_CHOICES = (WorkerKind.LLAMACPP_SLOTS, WorkerKind.EXLLAMAV2)
# a JSON response_format on text completions: llmup's own workers
GRAMMAR_COMPLETIONS = (WorkerKind.LLAMACPP_SLOTS, WorkerKind.EXLLAMAV2)
INSTEAD = {
    WorkerKind.EXLLAMAV2: "serve a GGUF model with `--backend llama.cpp`",
    WorkerKind.LLAMACPP_PYTHON: "run llmup's own worker (leave out `--llamacpp-impl server`)",
}


def check_supported(body: Any, kind: WorkerKind, *, max_messages: int) -> None:
    """BadRequestError for what the backend `kind` cannot do with this request."""
    instead = f" ({INSTEAD[kind]})" if kind in INSTEAD else ""
    if (body.n or 1) > 1 and kind not in MANY_CHOICES:
        raise BadRequestError(
            "n must be 1: this server's backend generates one choice per request (send n "
            f"requests){instead}",
            param="n",
            code="unsupported_value",
        )
    wants_logprobs = body.logprobs or getattr(body, "top_logprobs", None)
    if wants_logprobs and kind not in MANY_CHOICES:
        raise BadRequestError(
            "log probabilities are not available from this server's backend; leave "
            f"`logprobs` unset{instead}",
            param="logprobs",
            code="unsupported_parameter",
        )
    completion_format = getattr(body, "prompt", None) is not None and body.response_format
    if (
        completion_format
        and body.response_format.type != "text"
        and kind not in GRAMMAR_COMPLETIONS
    ):
        raise BadRequestError(
            "a JSON response_format on /v1/completions needs one of llmup's own workers "
            f"(llama_cpp.server ignores it){instead}",
            param="response_format",
            code="unsupported_parameter",
        )
    for name in UNSUPPORTED.get(kind, ()):
        if getattr(body, name, None) is not None:
            raise BadRequestError(
                f"`{name}` is not supported by the {kind} backend this server runs{instead}",
                param=name,
                code="unsupported_parameter",
            )
    messages = getattr(body, "messages", None) or []
    if len(messages) > max_messages:
        raise BadRequestError(
            f"{len(messages)} messages in one request, more than the {max_messages} allowed "
            "(LLMUP_PROXY__MAX_REQUEST_MESSAGES)",
            param="messages",
            code="too_many_messages",
        )
    check_named_tools(body)


def check_named_tools(body: Any) -> None:
    """`tool_choice` / `function_call` naming something the request does not define."""
    choice = getattr(body, "tool_choice", None)
    tools = {t.function.name for t in getattr(body, "tools", None) or []}
    if choice is not None and not isinstance(choice, str) and choice.function.name not in tools:
        raise BadRequestError(
            f"tool_choice names `{choice.function.name}`, which is not among `tools`",
            param="tool_choice",
        )
    if choice in ("auto", "required") and not tools:
        raise BadRequestError(f"tool_choice `{choice}` needs `tools`", param="tool_choice")
    call = getattr(body, "function_call", None)
    functions = {f.name for f in getattr(body, "functions", None) or []}
    if call is not None and not isinstance(call, str) and call.name not in functions:
        raise BadRequestError(
            f"function_call names `{call.name}`, which is not among `functions`",
            param="function_call",
        )


def check_logit_bias(body: Any, n_vocab: int | None) -> None:
    """Token ids in `logit_bias` must be below the vocabulary size (when the backend says)."""
    if not body.logit_bias or n_vocab is None:
        return
    bad = sorted(int(token) for token in body.logit_bias if int(token) >= n_vocab)
    if bad:
        raise BadRequestError(
            f"`logit_bias` names token id {bad[0]}, but the model's vocabulary has {n_vocab} "
            f"tokens (ids 0-{n_vocab - 1})",
            param="logit_bias",
            code="invalid_value",
        )
