"""What a request to llmup's own workers becomes before any token is generated: checked,
rendered and tokenized into a `Run` for the engine.

Everything here runs on a worker thread (`prepared`), never on the event loop: a prompt of
megabytes takes a second of CPU to parse, render and tokenize, and on the event loop it would
hold up `/health` (the supervisor restarts a worker that stops answering it) and every other
client's stream. The engine thread is never involved. All validation happens before the
first response byte, so errors keep their status.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from launcher.backends.generation import GenerationJob, GenerationParams, SessionKey
from launcher.errors import ProxyError
from launcher.protocol import (
    BACKEND_OWNER_HEADER,
    BACKEND_SESSION_HEADER,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    Usage,
)

BodyT = TypeVar("BodyT", bound=BaseModel)


class Tokenizer(Protocol):
    """`vocab_size` bounds client-supplied token ids: an id past it would fault the engine."""

    vocab_size: int

    def encode(
        self, text: str, *, bos: bool = False, eos: bool = False, special: bool = False
    ) -> list[int]:
        """Token ids of `text`; `special` parses "<s>"-style markers as control tokens."""
        ...

    def count_tokens(self, text: str) -> int:
        """Tokens in `text` as llama.cpp's /extras/tokenize/count counts them (BOS, special)."""
        ...


class Engine(Protocol):
    """What runs the jobs: `fatal_error` is set once it can no longer generate."""

    fatal_error: str | None

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def submit(self, job: GenerationJob) -> None: ...

    def pending(self) -> int: ...


class ApiError(ProxyError):
    """A client error to answer with an OpenAI-shaped body (status first, as HTTP reads)."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message, status=status, param=param, code=code)


@dataclass
class WorkerState:
    """One worker's model-facing parts; `sampling_extras(body)` returns extra
    `GenerationParams` fields (grammar, logit_bias...) or raises ApiError, and is None for
    an engine without them (then a non-text response_format is refused)."""

    tokenizer: Tokenizer
    engine: Engine
    chat_prompt: Callable[[list[ChatMessage]], list[int]]
    model_alias: str
    max_seq_len: int
    sampling_extras: Callable[[Any], dict[str, Any]] | None = None


@dataclass
class Run:
    """One request's prepared inputs and, as generation goes, its outcome."""

    prompt: list[int]
    params: GenerationParams
    stops: list[str]
    session: SessionKey | None = None
    completion_tokens: int = 0
    cached_tokens: int = 0
    finish_reason: str = "stop"

    def usage(self) -> Usage:
        usage = Usage.of(len(self.prompt), self.completion_tokens)
        if self.session is not None or self.cached_tokens:  # an extra field, as OpenAI names it
            usage.prompt_tokens_details = {"cached_tokens": self.cached_tokens}
        return usage


def worker_state(request: Request) -> WorkerState:
    return request.app.state.llmup


def session_key(request: Request) -> SessionKey | None:
    """The session the proxy named on its private headers: both or neither (the owner is
    empty when the proxy runs without API keys: every caller is then one owner)."""
    owner = request.headers.get(BACKEND_OWNER_HEADER)
    session = request.headers.get(BACKEND_SESSION_HEADER)
    if owner is None and session is None:
        return None
    if owner is None or not session:
        raise ApiError(400, f"{BACKEND_OWNER_HEADER} and {BACKEND_SESSION_HEADER} go together")
    return SessionKey(owner, session)


def check_model(state: WorkerState, model: str | None) -> None:
    if model is not None and model != state.model_alias:
        raise ApiError(
            404,
            f"The model `{model}` does not exist; this worker serves `{state.model_alias}`.",
            param="model",
            code="model_not_found",
        )


def _check_common(request: ChatCompletionRequest | CompletionRequest) -> None:
    if (request.n or 1) > 1:
        raise ApiError(400, "n > 1 is not supported by this backend", param="n")


def _chat_prompt(state: WorkerState, body: ChatCompletionRequest) -> list[int]:
    wants_json = body.response_format is not None and body.response_format.type != "text"
    if wants_json and state.sampling_extras is None:
        raise ApiError(
            400, "response_format other than text is not supported", param="response_format"
        )
    try:
        return state.chat_prompt(body.messages)
    except ValueError as exc:
        raise ApiError(400, str(exc), param="messages") from exc


def _completion_prompt(state: WorkerState, body: CompletionRequest) -> list[int]:
    """Like llama.cpp: a text prompt gets BOS and its "<s>"-style markers parsed."""
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and all(isinstance(x, int) for x in prompt):
        return _checked_ids(state, prompt)  # type: ignore[arg-type]
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise ApiError(400, "exactly one prompt per request is supported", param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, list):
        return _checked_ids(state, prompt)
    return state.tokenizer.encode(prompt, bos=True, special=True)


def _checked_ids(state: WorkerState, ids: list[int]) -> list[int]:
    """Client token ids must exist in the vocabulary: a bad id faults the engine."""
    size = state.tokenizer.vocab_size
    if not ids or any(not 0 <= i < size for i in ids):
        raise ApiError(400, f"prompt token ids must be in [0, {size})", param="prompt")
    return list(ids)


def _params(state: WorkerState, body: Any, prompt_len: int) -> GenerationParams:
    """Sampling settings, after checking the prompt and the reply fit the context."""
    room = state.max_seq_len - prompt_len
    wanted = body.requested_max_tokens()
    if room <= 0 or (wanted is not None and wanted > room):
        raise ApiError(
            400,
            f"This model's maximum context length is {state.max_seq_len} tokens. However, you "
            f"requested {prompt_len + (wanted or 0)} tokens ({prompt_len} in the prompt, "
            f"{wanted or 0} in the completion). Please reduce the prompt or max_tokens.",
            param="messages" if isinstance(body, ChatCompletionRequest) else "prompt",
            code="context_length_exceeded",
        )
    extras = state.sampling_extras(body) if state.sampling_extras else {}
    return GenerationParams(
        max_new_tokens=wanted or room,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        seed=body.seed,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        **extras,
    )


def _check_alive(state: WorkerState) -> None:
    if state.engine.fatal_error:
        raise ApiError(
            503,
            f"the engine failed and needs a restart: {state.engine.fatal_error}",
            code="engine_failed",
        )


def _prepare(
    state: WorkerState, body: ChatCompletionRequest | CompletionRequest, session: SessionKey | None
) -> Run:
    _check_alive(state)
    check_model(state, body.model)
    _check_common(body)
    if isinstance(body, ChatCompletionRequest):
        prompt = _chat_prompt(state, body)
    else:
        prompt = _completion_prompt(state, body)
    return Run(prompt, _params(state, body, len(prompt)), body.stop_list(), session)


def _validated(model: type[BodyT], raw: bytes) -> BodyT:
    """The body as `model`; a failure is the same 400 FastAPI's own validation gives."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None


def _parse_and_prepare(
    state: WorkerState, model: type[BodyT], raw: bytes, session: SessionKey | None
) -> tuple[BodyT, Run]:
    body = _validated(model, raw)
    return body, _prepare(state, body, session)  # type: ignore[arg-type]


async def parsed(request: Request, model: type[BodyT]) -> BodyT:
    """A request body parsed and validated off the event loop (see `prepared`)."""
    return await asyncio.to_thread(_validated, model, await request.body())


async def prepared(request: Request, model: type[BodyT]) -> tuple[BodyT, Run]:
    """Parse, validate, render and tokenize a generation request on a worker thread: a
    prompt of megabytes takes a second of CPU, and on the event loop it would hold up
    `/health` (the supervisor restarts a worker that stops answering it) and every other
    client's stream. The engine thread is never involved."""
    state = worker_state(request)
    session = session_key(request)
    raw = await request.body()
    return await asyncio.to_thread(_parse_and_prepare, state, model, raw, session)
