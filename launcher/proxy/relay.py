"""Relaying a backend's SSE stream to the client, event by event, without buffering.

The relay reads each event as it arrives, notes what the session and the metrics need
(text, finish reason, usage, time to first token) and passes the event on unchanged. A
stream that completes (a finish reason, then `[DONE]`) runs `on_complete` (the session
commit) *before* the client sees `[DONE]`, so the next turn always finds it stored. A stream
that breaks ends with an OpenAI error event and commits nothing. A client that goes away
cancels the relay, and closing the upstream response stops the backend's generation.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from launcher.errors import ProxyError
from launcher.protocol import error_body
from launcher.proxy.metrics import Metrics

log = logging.getLogger(__name__)


class IncompleteStream(Exception):
    """The backend ended its stream without a finish reason or without `[DONE]`."""


@dataclass
class StreamResult:
    """What a finished stream said, gathered while relaying it."""

    kind: str  # "chat" or "completion"
    parts: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    chunk_id: str | None = None
    model: str | None = None
    first_token_at: float | None = None
    completion_chunks: int = 0

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def feed(self, chunk: dict[str, Any]) -> None:
        self.chunk_id = chunk.get("id") or self.chunk_id
        self.model = chunk.get("model") or self.model
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue
            text = _choice_text(choice, self.kind)
            if text:
                self.parts.append(text)
                self.completion_chunks += 1
                self.first_token_at = self.first_token_at or time.perf_counter()
            self.finish_reason = choice.get("finish_reason") or self.finish_reason


def _choice_text(choice: dict[str, Any], kind: str) -> str | None:
    if kind == "chat":
        delta = choice.get("delta") or {}
        return delta.get("content") if isinstance(delta, dict) else None
    return choice.get("text")


def sse(data: str) -> bytes:
    return f"data: {data}\n\n".encode()


def error_event(exc: BaseException) -> bytes:
    """The event that ends a broken stream; the openai client raises it as an APIError."""
    if isinstance(exc, ProxyError):
        body = error_body(exc.message, status=exc.status, code=exc.code)
    else:
        body = error_body(
            "the model backend stopped in the middle of the reply; nothing was stored, retry",
            status=503,
            code="backend_stream_broken",
        )
    return sse(json.dumps(body))


class StreamRelay:
    """One relayed stream; iterate `events()` as the response body."""

    def __init__(
        self,
        response: httpx.Response,
        *,
        result: StreamResult,
        metrics: Metrics,
        started: float,
        wants_usage: bool,
        prompt_estimate: int | None = None,
        on_complete: Callable[[StreamResult], Awaitable[None]] | None = None,
    ) -> None:
        self.response = response
        self.result = result
        self.metrics = metrics
        self.started = started
        self.wants_usage = wants_usage
        self.prompt_estimate = prompt_estimate
        self.on_complete = on_complete

    async def events(self) -> AsyncIterator[bytes]:
        try:
            async for event in self._relay():
                yield event
            self._account()
            if self.on_complete is not None:
                await self.on_complete(self.result)
            if self.wants_usage and self.result.usage is None:
                yield sse(json.dumps(self._usage_chunk()))
            yield sse("[DONE]")
        except (httpx.HTTPError, IncompleteStream, ProxyError) as exc:
            log.warning("stream ended early: %r", exc)
            self.metrics.stream_errors.inc()
            yield error_event(exc)
        except Exception as exc:  # a bug must still end the stream cleanly, never hang it
            log.exception("stream failed")
            self.metrics.stream_errors.inc()
            yield error_event(exc)

    async def _relay(self) -> AsyncIterator[bytes]:
        done = False
        async for line in self.response.aiter_lines():
            if not line.startswith("data:"):
                continue  # comments (pings), event names, blank separators
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            chunk = _parse(data)
            if "error" in chunk:
                raise ProxyError(str(chunk["error"].get("message", "backend error")), status=502)
            self.result.feed(chunk)
            if _usage_only(chunk) and not self.wants_usage:
                continue
            yield sse(data)
        if not done or self.result.finish_reason is None:
            raise IncompleteStream("the backend's stream ended before the reply was complete")

    def _account(self) -> None:
        usage = self.result.usage or {}
        self.metrics.count_tokens(
            usage.get("prompt_tokens", self.prompt_estimate),
            usage.get("completion_tokens", self.result.completion_chunks),
        )
        if self.result.first_token_at is not None:
            self.metrics.ttft.observe(self.result.first_token_at - self.started)

    def _usage_chunk(self) -> dict[str, Any]:
        """The usage chunk a client asked for, when the backend sent none: the completion
        count is the number of text chunks (one token each from llama.cpp), the prompt
        count the proxy's own estimate."""
        prompt = int(self.prompt_estimate or 0)
        completion = self.result.completion_chunks
        chat = self.result.kind == "chat"
        return {
            "id": self.result.chunk_id or "",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": self.result.model or "",
            "choices": [],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            },
        }


def _parse(data: str) -> dict[str, Any]:
    try:
        chunk = json.loads(data)
    except ValueError as exc:
        raise IncompleteStream(f"the backend sent an unreadable event: {data[:80]!r}") from exc
    if not isinstance(chunk, dict):
        raise IncompleteStream("the backend sent an unexpected event")
    return chunk


def _usage_only(chunk: dict[str, Any]) -> bool:
    return bool(chunk.get("usage")) and not chunk.get("choices")


class OwnedStream(StreamingResponse):
    """A streaming response that releases what the request held (queue place, session
    lock, upstream response) however the stream ends, even when it never started."""

    def __init__(self, content: AsyncIterator[bytes], *, resources: AsyncExitStack, **kw: Any):
        super().__init__(content, media_type="text/event-stream", **kw)
        self.resources = resources

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.resources.aclose()
