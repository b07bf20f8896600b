"""The HTTP layer of llmup's own workers: OpenAI routes over an engine thread.

Both workers (exllamav2 for GPTQ, the llama.cpp session-slot worker for GGUF) serve the same
routes from here: `/v1/models`, chat and text completions (streamed or not), llama.cpp's
`/extras/tokenize[/count]` and `/health`. A worker supplies a `WorkerState`: its tokenizer,
how it renders a chat, which sampling extras it understands, and an engine that takes
`GenerationJob`s (`GenerationWorker` runs one at a time, `BatchEngine` batches them).

All validation happens before the first response byte, so errors keep their status. Stop
strings are matched here (`StopScanner`), so every engine shares one tested implementation;
a match, like a client that hangs up, cancels the job. The proxy names a request's session
on two private headers (owner hash, session id); they reach the engine as the job's
`SessionKey`, and a slot-keeping engine reports the prompt tokens it did not re-evaluate as
OpenAI's `usage.prompt_tokens_details.cached_tokens`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from launcher.api_errors import error_response, install_error_handlers
from launcher.backends.backend_key import require_backend_key
from launcher.backends.generation import (
    END,
    GenerationJob,
    GenerationParams,
    SessionKey,
    StopScanner,
    TokenEvent,
    first_line,
)
from launcher.errors import ProxyError
from launcher.protocol import (
    BACKEND_OWNER_HEADER,
    BACKEND_SESSION_HEADER,
    ChatCompletionChunk,
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    Choice,
    ChoiceDelta,
    ChunkChoice,
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    TokenizeInputCountResponse,
    TokenizeInputRequest,
    TokenizeInputResponse,
    Usage,
    error_body,
    new_id,
    now,
)

logger = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.25
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


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


class GenerationError(RuntimeError):
    """The engine failed mid-request; the client gets a 500 or an error event."""


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
class _Run:
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


# ---- request handling ---------------------------------------------------------------------


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


def _check_model(state: WorkerState, model: str | None) -> None:
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
    state: WorkerState, body: ChatCompletionRequest | CompletionRequest, request: Request
) -> _Run:
    _check_alive(state)
    _check_model(state, body.model)
    _check_common(body)
    session = session_key(request)
    if isinstance(body, ChatCompletionRequest):
        prompt = _chat_prompt(state, body)
    else:
        prompt = _completion_prompt(state, body)
    return _Run(prompt, _params(state, body, len(prompt)), body.stop_list(), session)


# ---- generation ---------------------------------------------------------------------------


async def _token_events(engine: Engine, run: _Run) -> AsyncIterator[TokenEvent]:
    """Bridge the engine thread into the event loop; leaving early cancels the generation."""
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[object] = asyncio.Queue()
    cancel = threading.Event()

    def emit(item: object) -> None:
        try:
            loop.call_soon_threadsafe(inbox.put_nowait, item)
        except RuntimeError:  # the loop is gone: nobody is listening any more
            cancel.set()

    job = GenerationJob(run.prompt, run.params, cancel, emit, run.session)
    engine.submit(job)
    try:
        while (item := await inbox.get()) is not END:
            if isinstance(item, BaseException):
                raise GenerationError(f"generation failed: {first_line(item)}") from item
            run.cached_tokens = job.cached_tokens
            yield item  # type: ignore[misc]
    finally:
        cancel.set()


async def _pieces(engine: Engine, run: _Run) -> AsyncIterator[str]:
    """The reply's text as it comes, cut at a stop string; fills in run's outcome."""
    scanner = StopScanner(run.stops)
    async with aclosing(_token_events(engine, run)) as events:
        async for event in events:
            run.completion_tokens += event.tokens
            text, matched = scanner.feed(event.text)
            if text:
                yield text
            if matched:
                run.finish_reason = "stop"
                return
            if event.finish_reason:
                run.finish_reason = event.finish_reason
                break
    if tail := scanner.flush():
        yield tail


async def _collect(request: Request, engine: Engine, run: _Run) -> str | None:
    """The whole reply, or None when the client hung up (the generation is then cancelled)."""

    async def collect() -> str:
        async with aclosing(_pieces(engine, run)) as pieces:
            return "".join([piece async for piece in pieces])

    task = asyncio.ensure_future(collect())
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if not task.done() and await request.is_disconnected():
                logger.info("client disconnected; generation cancelled")
                return None
        return task.result()
    finally:
        task.cancel()


def _sse(chunks: AsyncIterator[BaseModel]) -> StreamingResponse:
    """`data: {json}` events, then `data: [DONE]`; a failure sends an error event and ends."""

    async def body() -> AsyncIterator[str]:
        async with aclosing(chunks) as stream:
            try:
                async for chunk in stream:
                    yield f"data: {chunk.model_dump_json()}\n\n"
            except GenerationError as exc:
                error = error_body(str(exc), status=500, code="generation_failed")
                yield f"data: {json.dumps(error)}\n\n"
                return
        yield "data: [DONE]\n\n"

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)


async def _chat_chunks(
    engine: Engine, run: _Run, model: str, include_usage: bool
) -> AsyncIterator[ChatCompletionChunk]:
    cid, created = new_id("chatcmpl"), now()

    def chunk(delta: ChoiceDelta, finish: str | None = None) -> ChatCompletionChunk:
        choice = ChunkChoice(delta=delta, finish_reason=finish)
        return ChatCompletionChunk(id=cid, created=created, model=model, choices=[choice])

    yield chunk(ChoiceDelta(role="assistant", content=""))
    async with aclosing(_pieces(engine, run)) as pieces:
        async for text in pieces:
            yield chunk(ChoiceDelta(content=text))
    yield chunk(ChoiceDelta(), run.finish_reason)
    if include_usage:
        yield ChatCompletionChunk(
            id=cid, created=created, model=model, choices=[], usage=run.usage()
        )


async def _completion_chunks(
    engine: Engine, run: _Run, model: str, include_usage: bool
) -> AsyncIterator[CompletionChunk]:
    cid, created = new_id("cmpl"), now()

    def chunk(text: str, finish: str | None = None) -> CompletionChunk:
        choice = CompletionChoice(text=text, finish_reason=finish)
        return CompletionChunk(id=cid, created=created, model=model, choices=[choice])

    async with aclosing(_pieces(engine, run)) as pieces:
        async for text in pieces:
            yield chunk(text)
    yield chunk("", run.finish_reason)
    if include_usage:
        yield CompletionChunk(id=cid, created=created, model=model, choices=[], usage=run.usage())


# ---- routes -------------------------------------------------------------------------------

router = APIRouter()


@router.get("/health", response_model=None)
async def health(request: Request) -> dict[str, Any] | JSONResponse:
    """200 while the engine can generate; 503 after a fatal fault, so the supervisor restarts."""
    state = worker_state(request)
    if state.engine.fatal_error:
        body = {"status": "failed", "model": state.model_alias, "error": state.engine.fatal_error}
        return JSONResponse(body, status_code=503)
    return {"status": "ok", "model": state.model_alias, "pending": state.engine.pending()}


@router.get("/v1/models")
async def list_models(request: Request) -> ModelList:
    state = worker_state(request)
    card = ModelCard(id=state.model_alias, max_model_len=state.max_seq_len)
    return ModelList(data=[card])


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest, request: Request
) -> ChatCompletionResponse | Response:
    state = worker_state(request)
    run = _prepare(state, body, request)
    if body.stream:
        return _sse(_chat_chunks(state.engine, run, body.model, body.wants_usage_chunk()))
    text = await _collect(request, state.engine, run)
    if text is None:
        return Response(status_code=499)
    message = ChatCompletionMessage(content=text)
    choice = Choice(message=message, finish_reason=run.finish_reason)
    return ChatCompletionResponse(model=body.model, choices=[choice], usage=run.usage())


@router.post("/v1/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request) -> CompletionResponse | Response:
    state = worker_state(request)
    run = _prepare(state, body, request)
    if body.stream:
        return _sse(_completion_chunks(state.engine, run, body.model, body.wants_usage_chunk()))
    text = await _collect(request, state.engine, run)
    if text is None:
        return Response(status_code=499)
    choice = CompletionChoice(text=text, finish_reason=run.finish_reason)
    return CompletionResponse(model=body.model, choices=[choice], usage=run.usage())


@router.post("/extras/tokenize")
async def tokenize(body: TokenizeInputRequest, request: Request) -> TokenizeInputResponse:
    """Same route and shape as llama_cpp.server, so the proxy counts tokens one way."""
    state = worker_state(request)
    _check_model(state, body.model)
    tokens = state.tokenizer.encode(body.input, bos=True, special=True)
    return TokenizeInputResponse(tokens=tokens)


@router.post("/extras/tokenize/count")
async def tokenize_count(
    body: TokenizeInputRequest, request: Request
) -> TokenizeInputCountResponse:
    state = worker_state(request)
    _check_model(state, body.model)
    return TokenizeInputCountResponse(count=state.tokenizer.count_tokens(body.input))


# ---- errors as OpenAI bodies --------------------------------------------------------------


async def _generation_error(_: Request, exc: GenerationError) -> JSONResponse:
    return error_response(str(exc), 500, code="generation_failed")


def create_worker_app(
    state: WorkerState, *, title: str, routers: tuple[APIRouter, ...] = ()
) -> FastAPI:
    """A worker's FastAPI app; all state lives on `app.state`, so tests build their own.
    The engine starts with the app and stops (saving what it keeps) when the app ends."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(state.engine.stop)

    app = FastAPI(title=title, lifespan=lifespan)
    app.state.llmup = state
    app.include_router(router)
    for extra in routers:
        app.include_router(extra)
    install_error_handlers(app)
    app.add_exception_handler(GenerationError, _generation_error)
    return app


def run_worker(app: FastAPI, *, host: str, port: int, log_level: str) -> None:
    """Serve a worker's app behind the run's backend key until SIGTERM; a stream in flight
    must not hold off the supervisor's SIGTERM for long (5 s)."""
    uvicorn.run(
        require_backend_key(app),
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=5,
    )
