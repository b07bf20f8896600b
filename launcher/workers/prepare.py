"""A request as llmup's workers take it in: the model-facing parts a worker supplies
(`WorkerState`), and what one request asks of them: its session, its prompt tokens (the chat
template rendered, or the completion prompt), and its sampling settings after checking that
the prompt and the reply fit the context.

Counting a prompt (`count_prompt`, the proxy's `/llmup/prompt-tokens`) runs the same code as
preparing a generation, so the proxy's idea of a prompt's length is the worker's own.

Parsing, rendering and tokenizing run on a worker thread (`prepared`, `parsed`), never on the
event loop: a prompt of megabytes takes a second of CPU, and on the event loop it would hold
up `/health` (the supervisor restarts a worker that stops answering it) and every other
client's stream. The engine thread is never involved. All validation happens before the
first response byte, so errors keep their status.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from launcher.errors import ApiError, BadRequestError, NotFoundError
from launcher.protocol import (
    BACKEND_OWNER_HEADER,
    BACKEND_SESSION_HEADER,
    COMPLETION_DEFAULT_MAX_TOKENS,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    PromptTokens,
    Usage,
    context_length_message,
)
from launcher.reply_format import ReplyFormatError, ToolUse, tool_use
from launcher.workers.chat_render import ChatTurns, chat_turns
from launcher.workers.generation import GenerationJob, GenerationParams, SessionKey

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


class SamplingExtras(BaseModel):
    """The request fields beyond OpenAI's that llama.cpp's servers accept, with their bounds;
    each worker takes what its engine can apply."""

    model_config = ConfigDict(extra="ignore")
    grammar: str | None = None
    top_k: int = Field(default=0, ge=0)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    repeat_penalty: float = Field(default=1.0, ge=0.0, le=100.0)
    min_tokens: int = Field(default=0, ge=0)
    mirostat_mode: int = Field(default=0, ge=0, le=2)
    mirostat_tau: float = Field(default=5.0, ge=0.0, le=10.0)
    mirostat_eta: float = Field(default=0.1, ge=0.001, le=1.0)

    def params(self) -> dict[str, Any]:
        """The `GenerationParams` fields they set (the grammar aside: a worker builds it)."""
        return {
            "top_k": self.top_k,
            "min_p": self.min_p,
            "repeat_penalty": self.repeat_penalty,
            "min_tokens": self.min_tokens,
            "mirostat": self.mirostat_mode,
            "mirostat_tau": self.mirostat_tau,
            "mirostat_eta": self.mirostat_eta,
        }


def sampling_extras(body: Any) -> SamplingExtras:
    """A request's extras, checked; a bad one is a 400 naming it."""
    try:
        return SamplingExtras.model_validate(body.model_extra or {})
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise BadRequestError(f"{param}: {first['msg']}", param=param) from None


@dataclass
class WorkerState:
    """One worker's model-facing parts; `sampling_extras(body)` returns extra
    `GenerationParams` fields (grammar, logit_bias...) or raises BadRequestError; `grammar` says
    whether the engine applies grammars (without, a JSON response_format and tool calls
    are refused). `identity` is what identifies the served build (backend and
    version, model files, load settings): the proxy derives the replies'
    `system_fingerprint` from it. `native_tools`: the model's chat template renders tools
    itself; `max_choices`: the most choices (`n`) one request may ask for; `logprobs`: the
    engine reports log probabilities."""

    tokenizer: Tokenizer
    engine: Engine
    chat_prompt: Callable[[ChatTurns], list[int]]
    model_alias: str
    max_seq_len: int
    sampling_extras: Callable[[Any], dict[str, Any]] | None = None
    identity: dict[str, Any] = field(default_factory=dict)
    native_tools: bool = False
    max_choices: int = 1
    choices_limit: str = ""  # why max_choices, for the 400 that names it
    logprobs: bool = False
    grammar: bool = False


@dataclass
class Run:
    """One request's prepared inputs and, as generation goes, its outcome. `tools`: the
    calls to read out of the reply (None when no call can come); `echo`: text completions'
    prompt, sent back before the reply; `offset`: where the reply begins for
    `logprobs.text_offset` (the prompt's length in characters)."""

    prompt: list[int]
    params: GenerationParams
    stops: list[str]
    session: SessionKey | None = None
    tools: ToolUse | None = None
    echo: str = ""
    offset: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    owner: str | None = None

    def usage(self) -> Usage:
        usage = Usage.of(len(self.prompt), self.completion_tokens)
        if self.session is not None or self.cached_tokens:  # an extra field, as OpenAI names it
            usage.prompt_tokens_details = {"cached_tokens": self.cached_tokens}
        return usage


def worker_state(request: Request) -> WorkerState:
    return request.app.state.llmup


# ---- request handling ---------------------------------------------------------------------


def session_key(request: Request) -> SessionKey | None:
    """The session the proxy named on its private headers (the owner is empty when the
    proxy runs without API keys: every caller is then one owner). The owner alone names a
    stateless request's caller; a session without its owner is refused."""
    owner = request.headers.get(BACKEND_OWNER_HEADER)
    session = request.headers.get(BACKEND_SESSION_HEADER)
    if session is None:
        return None
    if owner is None or not session:
        raise BadRequestError(f"{BACKEND_SESSION_HEADER} needs {BACKEND_OWNER_HEADER}")
    return SessionKey(owner, session)


def request_owner(request: Request) -> str | None:
    """The caller's owner as the proxy named it (None when called directly)."""
    return request.headers.get(BACKEND_OWNER_HEADER)


def check_model(state: WorkerState, model: str | None) -> None:
    if model is not None and model != state.model_alias:
        raise NotFoundError(
            f"The model `{model}` does not exist; this worker serves `{state.model_alias}`.",
            param="model",
            code="model_not_found",
        )


def _check_common(state: WorkerState, body: ChatCompletionRequest | CompletionRequest) -> None:
    n = body.n or 1
    if n > state.max_choices:
        raise BadRequestError(
            f"n is {n}, but this server generates at most {state.max_choices} choices per "
            f"request{state.choices_limit}",
            param="n",
            code="unsupported_value",
        )
    response_format = getattr(body, "response_format", None)
    wants_json = response_format is not None and response_format.type != "text"
    if wants_json and not state.grammar:
        raise BadRequestError(
            "a JSON response_format needs a grammar, which this backend cannot apply; serve "
            "a GGUF model with `--backend llama.cpp`",
            param="response_format",
        )


def _tool_use(state: WorkerState, body: ChatCompletionRequest) -> ToolUse | None:
    """The request's tools; calls need a grammar (llama.cpp) to be forced or read."""
    try:
        use = tool_use(body)
    except ReplyFormatError as exc:
        raise BadRequestError(str(exc), param=exc.param) from None
    if use is not None and use.callable and not state.grammar:
        field = "functions" if use.legacy else "tools"
        raise BadRequestError(
            f"`{field}` need a grammar to make the model call them, which this backend "
            "cannot apply; serve a GGUF model with `--backend llama.cpp`",
            param=field,
        )
    return use


def _chat_prompt(state: WorkerState, body: ChatCompletionRequest, use: ToolUse | None) -> list[int]:
    try:
        turns = chat_turns(body.messages, use, native=state.native_tools)
        return state.chat_prompt(turns)
    except ValueError as exc:
        raise BadRequestError(str(exc), param="messages") from exc


def _completion_prompt(state: WorkerState, body: CompletionRequest) -> list[int]:
    """Like llama.cpp: a text prompt gets BOS and its "<s>"-style markers parsed."""
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and all(isinstance(x, int) for x in prompt):
        return _checked_ids(state, prompt)  # type: ignore[arg-type]
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise BadRequestError("exactly one prompt per request is supported", param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, list):
        return _checked_ids(state, prompt)
    return state.tokenizer.encode(prompt, bos=True, special=True)


def _checked_ids(state: WorkerState, ids: list[int]) -> list[int]:
    """Client token ids must exist in the vocabulary: a bad id faults the engine."""
    size = state.tokenizer.vocab_size
    if not ids or any(not 0 <= i < size for i in ids):
        raise BadRequestError(f"prompt token ids must be in [0, {size})", param="prompt")
    return list(ids)


def _params(state: WorkerState, body: Any, prompt_len: int) -> GenerationParams:
    """Sampling settings, after checking the prompt and the reply fit the context.

    Without max_tokens a chat reply may run to the end of the context (OpenAI's and
    llama-server's behaviour) and a completion gets OpenAI's 16 tokens, or what is left:
    this worker counted the prompt, so nothing it did not count can make it refuse."""
    room = state.max_seq_len - prompt_len
    wanted = body.requested_max_tokens()
    if room <= 0 or (wanted is not None and wanted > room):
        chat = isinstance(body, ChatCompletionRequest)
        raise BadRequestError(
            context_length_message(
                state.max_seq_len, prompt_len, wanted or 1, "messages" if chat else "prompt"
            ),
            param="messages" if chat else "prompt",
            code="context_length_exceeded",
        )
    if wanted is None:
        chat = isinstance(body, ChatCompletionRequest)
        wanted = room if chat else min(COMPLETION_DEFAULT_MAX_TOKENS, room)
    extras = state.sampling_extras(body) if state.sampling_extras else {}
    return GenerationParams(
        max_new_tokens=wanted,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        seed=body.seed,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        n=body.n or 1,
        logprobs=_logprobs(state, body),
        **extras,
    )


def _logprobs(state: WorkerState, body: Any) -> int | None:
    """How many alternatives per token the request wants with log probabilities (None:
    none): chat's `logprobs` + `top_logprobs`, completions' `logprobs`."""
    if isinstance(body, ChatCompletionRequest):
        if body.top_logprobs is not None and not body.logprobs:
            raise BadRequestError("top_logprobs needs `logprobs: true`", param="top_logprobs")
        wanted = (body.top_logprobs or 0) if body.logprobs else None
    else:
        wanted = body.logprobs
    if wanted is not None and not state.logprobs:
        raise BadRequestError(
            "log probabilities are not available from this backend; serve a GGUF model "
            "with `--backend llama.cpp`",
            param="logprobs",
        )
    return wanted


def _check_alive(state: WorkerState) -> None:
    if state.engine.fatal_error:
        raise ApiError(
            f"the engine failed and needs a restart: {state.engine.fatal_error}",
            status=503,
            code="engine_failed",
        )


def prepare(
    state: WorkerState, body: ChatCompletionRequest | CompletionRequest, session: SessionKey | None
) -> Run:
    _check_alive(state)
    check_model(state, body.model)
    _check_common(state, body)
    if isinstance(body, ChatCompletionRequest):
        use = _tool_use(state, body)
        prompt = _chat_prompt(state, body, use)
        params = _params(state, body, len(prompt))
        calls = use if use is not None and use.callable else None
        return Run(prompt, params, body.stop_list(), session, tools=calls)
    prompt = _completion_prompt(state, body)
    run = Run(prompt, _params(state, body, len(prompt)), body.stop_list(), session)
    return _with_echo(body, run)


def _with_echo(body: CompletionRequest, run: Run) -> Run:
    """`echo` sends the prompt back before the reply; `logprobs.text_offset` counts it."""
    if body.suffix is not None:
        raise BadRequestError("`suffix` (fill in the middle) is not supported", param="suffix")
    text = body.prompt if isinstance(body.prompt, str) else None
    if isinstance(body.prompt, list) and len(body.prompt) == 1 and isinstance(body.prompt[0], str):
        text = body.prompt[0]
    if body.echo:
        if run.params.logprobs is not None:
            raise BadRequestError(
                "`echo` with `logprobs` is not supported (no prompt logprobs)", param="echo"
            )
        if text is None:
            raise BadRequestError("`echo` needs a text prompt", param="echo")
        run.echo = text
    run.offset = len(text) if text is not None else 0
    return run


def count_prompt(state: WorkerState, body: dict[str, Any]) -> PromptTokens:
    """A chat or completion request's prompt as this worker would generate from it (the
    same rendering and tokenizing), without generating."""
    try:
        if "messages" in body:
            chat = ChatCompletionRequest.model_validate(body)
            return PromptTokens(
                prompt_tokens=len(_chat_prompt(state, chat, _tool_use(state, chat))),
                context=state.max_seq_len,
                message_tokens=[_content_tokens(state, m) for m in chat.messages],
            )
        completion = CompletionRequest.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise BadRequestError(f"{param}: {first['msg']}", param=param) from None
    prompt = _completion_prompt(state, completion)
    return PromptTokens(prompt_tokens=len(prompt), context=state.max_seq_len)


def _content_tokens(state: WorkerState, message: ChatMessage) -> int:
    """A message's content (and tool calls) in tokens, without the template's markers."""
    calls = [f"{c.function.name}\n{c.function.arguments}" for c in message.tool_calls or []]
    try:
        text = "\n".join([message.text(), *calls])
    except ValueError as exc:
        raise BadRequestError(str(exc), param="messages") from exc
    return len(state.tokenizer.encode(text))


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
    return body, prepare(state, body, session)  # type: ignore[arg-type]


async def parsed(request: Request, model: type[BodyT]) -> BodyT:
    """A request body parsed and validated off the event loop (see `prepared`)."""
    return await asyncio.to_thread(_validated, model, await request.body())


async def prepared(request: Request, model: type[BodyT]) -> tuple[BodyT, Run]:
    """Parse, validate, render and tokenize a generation request on a worker thread."""
    state = worker_state(request)
    session, owner = session_key(request), request_owner(request)
    raw = await request.body()
    body, run = await asyncio.to_thread(_parse_and_prepare, state, model, raw, session)
    run.owner = owner
    return body, run


async def counted(request: Request) -> PromptTokens:
    """`count_prompt` of the request's JSON body, off the event loop like a generation."""
    state = worker_state(request)
    raw = await request.body()
    return await asyncio.to_thread(_count_raw, state, raw)


def _count_raw(state: WorkerState, raw: bytes) -> PromptTokens:
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise BadRequestError(f"the body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequestError("the body must be a JSON object")
    return count_prompt(state, body)
