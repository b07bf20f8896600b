"""llmup's HTTP worker for GPTQ models: exllamav2's dynamic generator behind OpenAI routes.

exllamav2 ships no OpenAI server, so this module is one. It is started by the supervisor as
``python -m launcher.backends.exllamav2_server --model-dir DIR --port N`` on 127.0.0.1; the
proxy is the public surface, and the worker answers only requests that carry the run's
backend key (`backend_key`). Argument parsing and ``--help`` never import torch or exllamav2,
and a missing package or GPU ends the process with exit code 2 and one log line that says what
to install, so the supervisor can classify the failure as a missing dependency.

The HTTP layer talks to the small `Generator` interface of `exllamav2_engine`, so tests drive
it on the CPU with a fake. Generation runs on one worker thread that owns the model: requests
are served one at a time in arrival order (the dynamic generator's batching is not used; one
job keeps cancellation, errors and memory per request simple, and the proxy bounds its own
queue).
Stop strings are matched by this layer (`StopScanner`), not by the exllamav2 job, so the fake
and the real generator share one tested implementation; a match cancels the job.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import threading
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from launcher.api_errors import error_response, install_error_handlers
from launcher.backends.backend_key import require_backend_key
from launcher.backends.exllamav2_engine import (
    END,
    ExllamaGenerator,
    GenerationJob,
    GenerationParams,
    GenerationWorker,
    Generator,
    LoadOptions,
    StopScanner,
    TokenEvent,
    WorkerStartupError,
    first_line,
)
from launcher.backends.llama2_chat import build_prompt
from launcher.errors import ProxyError
from launcher.planning.exllamav2 import CACHE_MODES
from launcher.protocol import (
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


async def _token_events(
    worker: GenerationWorker, prompt: list[int], params: GenerationParams
) -> AsyncIterator[TokenEvent]:
    """Bridge the worker thread into the event loop; leaving early cancels the generation."""
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[object] = asyncio.Queue()
    cancel = threading.Event()

    def emit(item: object) -> None:
        try:
            loop.call_soon_threadsafe(inbox.put_nowait, item)
        except RuntimeError:  # the loop is gone: nobody is listening any more
            cancel.set()

    worker.submit(GenerationJob(prompt, params, cancel, emit))
    try:
        while (item := await inbox.get()) is not END:
            if isinstance(item, BaseException):
                raise GenerationError(f"generation failed: {first_line(item)}") from item
            yield item  # type: ignore[misc]
    finally:
        cancel.set()


class GenerationError(RuntimeError):
    """The engine failed mid-request; the client gets a 500 or an error event."""


# ---- request handling ---------------------------------------------------------------------


class ApiError(ProxyError):
    """A client error to answer with an OpenAI-shaped body (status first, as HTTP reads)."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message, status=status, param=param, code=code)


@dataclass
class _State:
    generator: Generator
    worker: GenerationWorker
    model_alias: str
    max_seq_len: int


@dataclass
class _Run:
    """One request's prepared inputs and, as generation goes, its outcome."""

    prompt: list[int]
    params: GenerationParams
    stops: list[str]
    completion_tokens: int = 0
    finish_reason: str = "stop"

    def usage(self) -> Usage:
        return Usage.of(len(self.prompt), self.completion_tokens)


def _state(request: Request) -> _State:
    return request.app.state.llmup


def _check_model(state: _State, model: str | None) -> None:
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


def _chat_prompt(state: _State, body: ChatCompletionRequest) -> list[int]:
    """Meta's segmented Llama-2 prompt: each segment gets its own BOS (and EOS when closed)."""
    if body.response_format is not None and body.response_format.type != "text":
        raise ApiError(
            400, "response_format other than text is not supported", param="response_format"
        )
    try:
        turns = [("system" if m.role == "developer" else m.role, m.text()) for m in body.messages]
        prompt = build_prompt(turns)
    except ValueError as exc:
        raise ApiError(400, str(exc), param="messages") from exc
    encode = state.generator.encode
    return [t for seg in prompt.segments for t in encode(seg.text, bos=True, eos=seg.eos)]


def _completion_prompt(state: _State, body: CompletionRequest) -> list[int]:
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
    return state.generator.encode(prompt, bos=True, special=True)


def _checked_ids(state: _State, ids: list[int]) -> list[int]:
    """Client token ids must exist in the vocabulary: a bad id faults the GPU, not the client."""
    if not ids or any(not 0 <= i < state.generator.vocab_size for i in ids):
        raise ApiError(
            400, f"prompt token ids must be in [0, {state.generator.vocab_size})", param="prompt"
        )
    return list(ids)


def _params(state: _State, body: Any, prompt_len: int) -> GenerationParams:
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
    return GenerationParams(
        max_new_tokens=wanted or room,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        seed=body.seed,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
    )


def _check_alive(state: _State) -> None:
    if state.worker.fatal_error:
        raise ApiError(
            503,
            f"the engine failed and needs a restart: {state.worker.fatal_error}",
            code="engine_failed",
        )


def _prepare(state: _State, body: ChatCompletionRequest | CompletionRequest) -> _Run:
    """All validation happens here, before any response byte, so errors keep their status."""
    _check_alive(state)
    _check_model(state, body.model)
    _check_common(body)
    if isinstance(body, ChatCompletionRequest):
        prompt = _chat_prompt(state, body)
    else:
        prompt = _completion_prompt(state, body)
    return _Run(prompt, _params(state, body, len(prompt)), body.stop_list())


async def _pieces(worker: GenerationWorker, run: _Run) -> AsyncIterator[str]:
    """The reply's text as it comes, cut at a stop string; fills in run's outcome."""
    scanner = StopScanner(run.stops)
    async with aclosing(_token_events(worker, run.prompt, run.params)) as events:
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


async def _collect(request: Request, worker: GenerationWorker, run: _Run) -> str | None:
    """The whole reply, or None when the client hung up (the generation is then cancelled)."""

    async def collect() -> str:
        async with aclosing(_pieces(worker, run)) as pieces:
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
    worker: GenerationWorker, run: _Run, model: str, include_usage: bool
) -> AsyncIterator[ChatCompletionChunk]:
    cid, created = new_id("chatcmpl"), now()

    def chunk(delta: ChoiceDelta, finish: str | None = None) -> ChatCompletionChunk:
        choice = ChunkChoice(delta=delta, finish_reason=finish)
        return ChatCompletionChunk(id=cid, created=created, model=model, choices=[choice])

    yield chunk(ChoiceDelta(role="assistant", content=""))
    async with aclosing(_pieces(worker, run)) as pieces:
        async for text in pieces:
            yield chunk(ChoiceDelta(content=text))
    yield chunk(ChoiceDelta(), run.finish_reason)
    if include_usage:
        yield ChatCompletionChunk(
            id=cid, created=created, model=model, choices=[], usage=run.usage()
        )


async def _completion_chunks(
    worker: GenerationWorker, run: _Run, model: str, include_usage: bool
) -> AsyncIterator[CompletionChunk]:
    cid, created = new_id("cmpl"), now()

    def chunk(text: str, finish: str | None = None) -> CompletionChunk:
        choice = CompletionChoice(text=text, finish_reason=finish)
        return CompletionChunk(id=cid, created=created, model=model, choices=[choice])

    async with aclosing(_pieces(worker, run)) as pieces:
        async for text in pieces:
            yield chunk(text)
    yield chunk("", run.finish_reason)
    if include_usage:
        yield CompletionChunk(id=cid, created=created, model=model, choices=[], usage=run.usage())


router = APIRouter()


@router.get("/health", response_model=None)
async def health(request: Request) -> dict[str, Any] | JSONResponse:
    """200 while the engine can generate; 503 after a CUDA fault, so the supervisor restarts."""
    state = _state(request)
    if state.worker.fatal_error:
        body = {"status": "failed", "model": state.model_alias, "error": state.worker.fatal_error}
        return JSONResponse(body, status_code=503)
    return {"status": "ok", "model": state.model_alias, "pending": state.worker.pending()}


@router.get("/v1/models")
async def list_models(request: Request) -> ModelList:
    state = _state(request)
    card = ModelCard(id=state.model_alias, max_model_len=state.max_seq_len)
    return ModelList(data=[card])


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest, request: Request
) -> ChatCompletionResponse | Response:
    state = _state(request)
    run = _prepare(state, body)
    if body.stream:
        chunks = _chat_chunks(state.worker, run, body.model, body.wants_usage_chunk())
        return _sse(chunks)
    text = await _collect(request, state.worker, run)
    if text is None:
        return Response(status_code=499)
    message = ChatCompletionMessage(content=text)
    choice = Choice(message=message, finish_reason=run.finish_reason)
    return ChatCompletionResponse(model=body.model, choices=[choice], usage=run.usage())


@router.post("/v1/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request) -> CompletionResponse | Response:
    state = _state(request)
    run = _prepare(state, body)
    if body.stream:
        chunks = _completion_chunks(state.worker, run, body.model, body.wants_usage_chunk())
        return _sse(chunks)
    text = await _collect(request, state.worker, run)
    if text is None:
        return Response(status_code=499)
    choice = CompletionChoice(text=text, finish_reason=run.finish_reason)
    return CompletionResponse(model=body.model, choices=[choice], usage=run.usage())


@router.post("/extras/tokenize")
async def tokenize(body: TokenizeInputRequest, request: Request) -> TokenizeInputResponse:
    """Same route and shape as llama_cpp.server, so the proxy counts tokens one way."""
    state = _state(request)
    _check_model(state, body.model)
    return TokenizeInputResponse(tokens=state.generator.encode(body.input, bos=True, special=True))


@router.post("/extras/tokenize/count")
async def tokenize_count(
    body: TokenizeInputRequest, request: Request
) -> TokenizeInputCountResponse:
    state = _state(request)
    _check_model(state, body.model)
    return TokenizeInputCountResponse(count=state.generator.count_tokens(body.input))


# ---- errors as OpenAI bodies --------------------------------------------------------------


async def _generation_error(_: Request, exc: GenerationError) -> JSONResponse:
    return error_response(str(exc), 500, code="generation_failed")


def create_app(generator: Generator, *, model_alias: str, max_seq_len: int) -> FastAPI:
    """The worker's FastAPI app; all state lives on `app.state`, so tests build their own."""
    worker = GenerationWorker(generator)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            worker.stop()

    app = FastAPI(title="llmup exllamav2 worker", lifespan=lifespan)
    app.state.llmup = _State(generator, worker, model_alias, max_seq_len)
    app.include_router(router)
    install_error_handlers(app)
    app.add_exception_handler(GenerationError, _generation_error)
    return app


# ---- command line -------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number 0-65535, got {text}")
    return value


def _gpu_split(text: str) -> list[float]:
    try:
        split = [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected GiB per GPU like 20,24, got {text!r}") from None
    if not split or any(value <= 0 for value in split):
        raise argparse.ArgumentTypeError(f"every GPU share must be positive, got {text!r}")
    return split


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m launcher.backends.exllamav2_server",
        description="OpenAI-compatible worker serving a GPTQ Llama-2 with exllamav2. It binds "
        "127.0.0.1 by default: llmup's proxy is the public surface.",
    )
    parser.add_argument("--model-dir", type=Path, required=True, help="GPTQ model folder")
    parser.add_argument("--port", type=_port, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--max-seq-len", type=_positive_int, default=4096, help="context tokens")
    parser.add_argument(
        "--cache-mode", type=str.upper, choices=CACHE_MODES, default="FP16", help="KV cache type"
    )
    parser.add_argument(
        "--gpu-split",
        type=_gpu_split,
        default=None,
        help="exllamav2 gpu_split: GiB per GPU for weights and fixed buffers (not the cache), "
        "e.g. 20,24 (default: autosplit, cache included)",
    )
    parser.add_argument("--model-alias", default=None, help="model id (default: repo name)")
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    return parser


def default_alias(model_dir: Path) -> str:
    """The repo name for a hub snapshot (…/models--org--name/snapshots/<sha>), else the folder."""
    path = model_dir.resolve()
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return path.parent.parent.name.split("--")[-1]
    return path.name


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)
    options = LoadOptions(args.model_dir, args.max_seq_len, args.cache_mode, args.gpu_split)
    try:
        generator = ExllamaGenerator.load(options)
    except WorkerStartupError as exc:
        logger.error("%s", exc)
        return exc.exit_code
    alias = args.model_alias or default_alias(args.model_dir)
    app = create_app(generator, model_alias=alias, max_seq_len=args.max_seq_len)
    logger.info("serving %s on http://%s:%d/v1", alias, args.host, args.port)
    # a stream in flight must not hold off the supervisor's SIGTERM for long
    uvicorn.run(
        require_backend_key(app),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=5,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
