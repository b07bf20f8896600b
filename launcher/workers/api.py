"""The HTTP layer of llmup's own workers: OpenAI routes over an engine thread.

Both workers (exllamav2 for GPTQ, the llama.cpp session-slot worker for GGUF) serve the same
routes from here: `/v1/models`, chat and text completions (streamed or not), llama.cpp's
`/extras/tokenize[/count]`, `/health`, and for the proxy `/llmup/meta` (vocabulary, context,
the build's identity) and `/llmup/prompt-tokens` (a request's prompt, rendered and counted
as it would be generated from). A worker supplies a `WorkerState` (`workers.prepare`): its
tokenizer, how it renders a chat, which sampling extras it understands, and an engine that
takes `GenerationJob`s (`GenerationWorker` runs one at a time, `BatchEngine` batches them).

A request is parsed, checked, rendered and tokenized off the event loop
(`prepare.prepared`), so a huge prompt never holds up `/health` or another client's
stream; all of it happens before the first response byte, so errors keep their status. Stop
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
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from typing import Any, Protocol

import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from launcher.api_errors import error_response, install_error_handlers
from launcher.protocol import (
    META_PATH,
    PROMPT_TOKENS_PATH,
    ChatCompletionChunk,
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
    ChoiceDelta,
    ChunkChoice,
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    PromptTokens,
    TokenizeInputCountResponse,
    TokenizeInputRequest,
    TokenizeInputResponse,
    error_body,
    new_id,
    now,
)
from launcher.workers.backend_key import require_backend_key
from launcher.workers.generation import END, GenerationJob, StopScanner, TokenEvent, first_line
from launcher.workers.prepare import (
    Engine,
    Run,
    WorkerState,
    check_model,
    counted,
    parsed,
    prepared,
    worker_state,
)

logger = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.25


class GenerationError(RuntimeError):
    """The engine failed mid-request; the client gets a 500 or an error event."""


# ---- generation ---------------------------------------------------------------------------


async def _token_events(engine: Engine, run: Run) -> AsyncIterator[TokenEvent]:
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


async def _pieces(engine: Engine, run: Run) -> AsyncIterator[str]:
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


async def _collect(request: Request, engine: Engine, run: Run) -> str | None:
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


class ChunkFactory(Protocol):
    """How one endpoint's stream chunks look; `_chunks` streams either kind alike."""

    def opening(self) -> list[BaseModel]: ...

    def text_chunk(self, text: str) -> BaseModel: ...

    def finish_chunk(self, reason: str | None) -> BaseModel: ...

    def usage_chunk(self, usage: Any) -> BaseModel: ...


class ChatChunks:
    """A streamed chat completion: a first chunk naming the assistant, content deltas, then
    the finish reason."""

    def __init__(self, model: str) -> None:
        self.model, self.id, self.created = model, new_id("chatcmpl"), now()

    def _chunk(self, delta: ChoiceDelta, finish: str | None = None) -> ChatCompletionChunk:
        choice = ChunkChoice(delta=delta, finish_reason=finish)
        return ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=[choice]
        )

    def opening(self) -> list[ChatCompletionChunk]:
        return [self._chunk(ChoiceDelta(role="assistant", content=""))]

    def text_chunk(self, text: str) -> ChatCompletionChunk:
        return self._chunk(ChoiceDelta(content=text))

    def finish_chunk(self, reason: str | None) -> ChatCompletionChunk:
        return self._chunk(ChoiceDelta(), reason)

    def usage_chunk(self, usage: Any) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=[], usage=usage
        )


class CompletionChunks:
    """A streamed text completion: text pieces, then the finish reason."""

    def __init__(self, model: str) -> None:
        self.model, self.id, self.created = model, new_id("cmpl"), now()

    def opening(self) -> list[CompletionChunk]:
        return []

    def text_chunk(self, text: str, finish: str | None = None) -> CompletionChunk:
        choice = CompletionChoice(text=text, finish_reason=finish)
        return CompletionChunk(id=self.id, created=self.created, model=self.model, choices=[choice])

    def finish_chunk(self, reason: str | None) -> CompletionChunk:
        return self.text_chunk("", reason)

    def usage_chunk(self, usage: Any) -> CompletionChunk:
        return CompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=[], usage=usage
        )


async def _chunks(
    engine: Engine, run: Run, factory: ChunkFactory, include_usage: bool
) -> AsyncIterator[BaseModel]:
    """One streamer for both endpoints; `factory` shapes its chunks."""
    for chunk in factory.opening():
        yield chunk
    async with aclosing(_pieces(engine, run)) as pieces:
        async for text in pieces:
            yield factory.text_chunk(text)
    yield factory.finish_chunk(run.finish_reason)
    if include_usage:
        yield factory.usage_chunk(run.usage())


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
async def chat_completions(request: Request) -> ChatCompletionResponse | Response:
    state = worker_state(request)
    body, run = await prepared(request, ChatCompletionRequest)
    if body.stream:
        chunks = ChatChunks(body.model)
        return _sse(_chunks(state.engine, run, chunks, body.wants_usage_chunk()))
    text = await _collect(request, state.engine, run)
    if text is None:
        return Response(status_code=499)
    message = ChatCompletionMessage(content=text)
    choice = Choice(message=message, finish_reason=run.finish_reason)
    return ChatCompletionResponse(model=body.model, choices=[choice], usage=run.usage())


@router.post("/v1/completions", response_model=None)
async def completions(request: Request) -> CompletionResponse | Response:
    state = worker_state(request)
    body, run = await prepared(request, CompletionRequest)
    if body.stream:
        chunks = CompletionChunks(body.model)
        return _sse(_chunks(state.engine, run, chunks, body.wants_usage_chunk()))
    text = await _collect(request, state.engine, run)
    if text is None:
        return Response(status_code=499)
    choice = CompletionChoice(text=text, finish_reason=run.finish_reason)
    return CompletionResponse(model=body.model, choices=[choice], usage=run.usage())


@router.post("/extras/tokenize")
async def tokenize(request: Request) -> TokenizeInputResponse:
    """Same route and shape as llama_cpp.server, so the proxy counts tokens one way; parsed
    and tokenized off the event loop, like a generation request."""
    state = worker_state(request)
    body = await parsed(request, TokenizeInputRequest)
    check_model(state, body.model)
    tokens = await asyncio.to_thread(state.tokenizer.encode, body.input, bos=True, special=True)
    return TokenizeInputResponse(tokens=tokens)


@router.post("/extras/tokenize/count")
async def tokenize_count(request: Request) -> TokenizeInputCountResponse:
    state = worker_state(request)
    body = await parsed(request, TokenizeInputRequest)
    check_model(state, body.model)
    count = await asyncio.to_thread(state.tokenizer.count_tokens, body.input)
    return TokenizeInputCountResponse(count=count)


@router.get(META_PATH)
async def meta(request: Request) -> dict[str, Any]:
    """The facts the proxy asks for: the vocabulary size (to check logit_bias), the context
    per request, that every stream ends with exact usage, and the build's identity."""
    state = worker_state(request)
    return {
        "n_vocab": state.tokenizer.vocab_size,
        "n_ctx": state.max_seq_len,
        "stream_usage": True,
        "identity": state.identity,
    }


@router.post(PROMPT_TOKENS_PATH)
async def prompt_tokens(request: Request) -> PromptTokens:
    """A request's prompt as this worker would generate from it: the proxy's one measure of
    whether a prompt fits."""
    return await counted(request)


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
