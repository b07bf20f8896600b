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
strings and tool calls are read out of each choice here (`choices`), so every engine
shares one tested implementation; a stop string ends its choice, and a client that hangs up
cancels the job. A request for n choices gets them interleaved as they come, each with its
own index, as OpenAI streams them: one streamer for chat and text completions, the chunks
shaped by `replies.ChatChunks` / `replies.CompletionChunks`. The proxy names a
request's session on two private headers (owner hash, session id); they reach the engine as
the job's `SessionKey`, and a slot-keeping engine reports the prompt tokens it did not
re-evaluate as OpenAI's `usage.prompt_tokens_details.cached_tokens`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from typing import Any

import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from launcher.api_errors import error_response, install_error_handlers
from launcher.protocol import (
    META_PATH,
    PROMPT_TOKENS_PATH,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    PromptTokens,
    TokenizeInputCountResponse,
    TokenizeInputRequest,
    TokenizeInputResponse,
    error_body,
)
from launcher.workers.backend_key import require_backend_key
from launcher.workers.choices import ChoiceOutput, Delta
from launcher.workers.generation import END, GenerationJob, TokenEvent, first_line
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
from launcher.workers.replies import (
    ChatChunks,
    ChunkFactory,
    CompletionChunks,
    chat_choices,
    completion_choices,
)

logger = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.25


class GenerationError(RuntimeError):
    """The engine failed mid-request; the client gets a 500 or an error event."""


# ---- generation ----------------------------------------------------------------------------


async def _token_events(engine: Engine, run: Run, stopped: set[int]) -> AsyncIterator[TokenEvent]:
    """Bridge the engine thread into the event loop; leaving early cancels the generation,
    and a choice added to `stopped` is ended alone."""
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[object] = asyncio.Queue()
    cancel = threading.Event()

    def emit(item: object) -> None:
        try:
            loop.call_soon_threadsafe(inbox.put_nowait, item)
        except RuntimeError:  # the loop is gone: nobody is listening any more
            cancel.set()

    job = GenerationJob(
        run.prompt, run.params, cancel, emit, run.session, stopped=stopped, owner=run.owner
    )
    engine.submit(job)
    try:
        while (item := await inbox.get()) is not END:
            if isinstance(item, BaseException):
                raise GenerationError(f"generation failed: {first_line(item)}") from item
            run.cached_tokens = job.cached_tokens
            yield item  # type: ignore[misc]
    finally:
        cancel.set()


def _outputs(run: Run) -> list[ChoiceOutput]:
    return [ChoiceOutput(i, run.stops, tools=run.tools is not None) for i in range(run.params.n)]


async def _deltas(
    engine: Engine, run: Run, outputs: list[ChoiceOutput]
) -> AsyncIterator[tuple[ChoiceOutput, Delta]]:
    """Each choice's deltas as they come, interleaved; a choice that reaches a stop string
    is ended alone, and the generation once every choice is over."""
    stopped: set[int] = set()
    async with aclosing(_token_events(engine, run, stopped)) as events:
        async for event in events:
            output = outputs[event.choice]
            if output.done:
                continue
            run.completion_tokens += event.tokens
            delta = output.feed(event)
            if output.done and event.finish_reason is None:
                stopped.add(output.index)
            yield output, delta
            if all(o.done for o in outputs):
                return


async def _collect(request: Request, engine: Engine, run: Run) -> list[ChoiceOutput] | None:
    """Every choice whole, or None when the client hung up (the generation is then
    cancelled)."""

    async def collect() -> list[ChoiceOutput]:
        outputs = _outputs(run)
        async with aclosing(_deltas(engine, run, outputs)) as deltas:
            async for _ in deltas:
                pass
        return outputs

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


async def _chunks(
    engine: Engine, run: Run, factory: ChunkFactory, include_usage: bool
) -> AsyncIterator[BaseModel]:
    """One streamer for both endpoints (`factory` shapes the chunks): every choice's
    opening, then their deltas interleaved as they come, each choice's finish as it ends,
    and the usage (OpenAI's order)."""
    outputs = _outputs(run)
    for chunk in factory.opening(outputs):
        yield chunk
    async with aclosing(_deltas(engine, run, outputs)) as deltas:
        async for output, delta in deltas:
            if delta:
                yield factory.delta_chunk(output, delta)
            if output.done:
                yield factory.finish_chunk(output)
    for output in outputs:
        if not output.done:  # the engine ended it without a word (shutting down)
            yield factory.finish_chunk(output)
    if include_usage:
        yield factory.usage_chunk(run.usage())


def _legacy(run: Run) -> bool:
    return bool(run.tools and run.tools.legacy)


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
    wants_logprobs = run.params.logprobs is not None
    if body.stream:
        chunks = ChatChunks(body.model, legacy=_legacy(run), logprobs=wants_logprobs)
        return _sse(_chunks(state.engine, run, chunks, body.wants_usage_chunk()))
    outputs = await _collect(request, state.engine, run)
    if outputs is None:
        return Response(status_code=499)
    choices = chat_choices(outputs, legacy=_legacy(run), logprobs=wants_logprobs)
    return ChatCompletionResponse(model=body.model, choices=choices, usage=run.usage())


@router.post("/v1/completions", response_model=None)
async def completions(request: Request) -> CompletionResponse | Response:
    state = worker_state(request)
    body, run = await prepared(request, CompletionRequest)
    wants_logprobs = run.params.logprobs is not None
    if body.stream:
        chunks = CompletionChunks(
            body.model, echo=run.echo, offset=run.offset, logprobs=wants_logprobs
        )
        return _sse(_chunks(state.engine, run, chunks, body.wants_usage_chunk()))
    outputs = await _collect(request, state.engine, run)
    if outputs is None:
        return Response(status_code=499)
    choices = completion_choices(outputs, echo=run.echo, offset=run.offset, logprobs=wants_logprobs)
    return CompletionResponse(model=body.model, choices=choices, usage=run.usage())


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
