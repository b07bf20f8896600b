"""Relaying a backend's SSE stream to the client, event by event, without buffering.

The relay reads each event as it arrives, notes what the session and the metrics need
(text, tool calls, finish reason, usage, time to first token) and passes the event on,
completed to OpenAI's chunk schema (`replies.conform_chunk`). Usage is the backend's own
count, never an estimate: llmup's workers end every stream with a usage chunk, which
reaches only a client that asked for it. A stream that completes (a finish reason, then
`[DONE]`) runs `on_complete` (the session commit) *before* the client sees `[DONE]`, so the
next turn always finds it stored. A stream that breaks ends with an OpenAI error event and
commits nothing; a backend that drops the connection is reported to `on_backend_drop` (a
crash). A client that goes away cancels the relay, and closing the upstream response stops
the backend's generation.
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
import orjson
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from launcher.errors import ApiError
from launcher.protocol import error_body
from launcher.proxy.metrics import Metrics
from launcher.proxy.replies import Reply, chunk_json, sse, with_fingerprint
from launcher.proxy.upstream import TRANSPORT_ERRORS, Stream, dropped

log = logging.getLogger(__name__)


class IncompleteStream(Exception):
    """The backend ended its stream without a finish reason or without `[DONE]`."""


@dataclass
class StreamResult:
    """What a finished stream said, gathered while relaying it."""

    kind: str  # "chat" or "completion"
    parts: list[str] = field(default_factory=list)
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    function_call: dict[str, str] | None = None  # the legacy functions API's one call
    finish_reason: str | None = None
    stop_string: str | None = None  # the stop string that ended it (the worker's stop_reason)
    usage: dict[str, Any] | None = None
    chunk_id: str | None = None
    model: str | None = None
    created: int | None = None
    first_token_at: float | None = None
    fingerprint: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def feed(self, chunk: dict[str, Any]) -> None:
        self.chunk_id = chunk.get("id") or self.chunk_id
        self.model = chunk.get("model") or self.model
        self.created = chunk.get("created") or self.created
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") if self.kind == "chat" else None
            text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
            if isinstance(delta, dict):
                self._feed_calls(delta.get("tool_calls") or [])
                self._feed_function(delta.get("function_call"))
            called = isinstance(delta, dict) and (
                delta.get("tool_calls") or delta.get("function_call")
            )
            if text or called:
                self.parts.append(text or "")
                self.first_token_at = self.first_token_at or time.perf_counter()
            self.finish_reason = choice.get("finish_reason") or self.finish_reason
            if isinstance(choice.get("stop_reason"), str):
                self.stop_string = choice["stop_reason"]

    def _feed_calls(self, deltas: list[Any]) -> None:
        """Tool-call deltas merged by index: id and name once, arguments piece by piece."""
        for delta in deltas:
            if not isinstance(delta, dict):
                continue
            call = self.tool_calls.setdefault(
                int(delta.get("index", 0)),
                {"id": "", "type": "function", "function": {"name": "", "arguments": ""}},
            )
            call["id"] = delta.get("id") or call["id"]
            function = delta.get("function") or {}
            call["function"]["name"] = function.get("name") or call["function"]["name"]
            call["function"]["arguments"] += function.get("arguments") or ""

    def _feed_function(self, delta: Any) -> None:
        if not isinstance(delta, dict):
            return
        call = self.function_call = self.function_call or {"name": "", "arguments": ""}
        call["name"] = delta.get("name") or call["name"]
        call["arguments"] += delta.get("arguments") or ""

    def reply(self) -> Reply:
        """The stream as one chat reply (what a session stores, and replays to a retry)."""
        message: dict[str, Any] = {"role": "assistant", "content": self.text, "refusal": None}
        if self.tool_calls:
            message["tool_calls"] = [self.tool_calls[i] for i in sorted(self.tool_calls)]
            message["content"] = self.text or None
        if self.function_call:
            message["function_call"] = self.function_call
            message["content"] = self.text or None
        choice = {"index": 0, "message": message, "logprobs": None}
        reply = {
            "id": self.chunk_id or "",
            "object": "chat.completion",
            "created": self.created or int(time.time()),
            "model": self.model or "",
            "choices": [{**choice, "finish_reason": self.finish_reason}],
            "usage": self.usage,
        }
        return with_fingerprint(reply, self.fingerprint)


def error_event(exc: BaseException) -> bytes:
    """The event that ends a broken stream; the openai client raises it as an APIError."""
    if isinstance(exc, ApiError):
        body = error_body(exc.message, status=exc.status, code=exc.code)
    elif isinstance(exc, (*TRANSPORT_ERRORS, IncompleteStream)):
        body = error_body(
            "the model backend stopped in the middle of the reply; nothing was stored, retry",
            status=503,
            code="backend_stream_broken",
        )
    else:
        body = error_body(
            "internal error in the llmup proxy; the reply was not stored, retry",
            status=500,
            code="internal_error",
        )
    return sse(json.dumps(body))


class StreamRelay:
    """One relayed stream; iterate `events()` as the response body."""

    def __init__(
        self,
        response: Stream,
        *,
        result: StreamResult,
        fingerprint: str | None = None,
        metrics: Metrics,
        started: float,
        wants_usage: bool,
        on_complete: Callable[[StreamResult], Awaitable[None]] | None = None,
        on_backend_drop: Callable[[], None] = lambda: None,
        api: str = "chat",
    ) -> None:
        self.api = api
        self.response = response
        self.result = result
        self.result.fingerprint = fingerprint
        self.metrics = metrics
        self.started = started
        self.wants_usage = wants_usage
        self.on_complete = on_complete
        self.on_backend_drop = on_backend_drop

    async def events(self) -> AsyncIterator[bytes]:
        try:
            async for event in self._relay():
                yield event
            self._account()
            if self.on_complete is not None:
                await self.on_complete(self.result)
            yield sse("[DONE]")
        except (*TRANSPORT_ERRORS, IncompleteStream, ApiError) as exc:
            log.warning("stream ended early: %r", exc)
            if dropped(exc):
                self.on_backend_drop()
            self.metrics.stream_errors.inc()
            yield error_event(exc)
        except Exception as exc:  # a bug must still end the stream cleanly, never hang it
            log.exception("stream failed")
            self.metrics.stream_errors.inc()
            yield error_event(exc)

    async def _relay(self) -> AsyncIterator[bytes]:
        """The backend's events, conformed, as they arrive; the events that one read brings
        go to the client in one write (a fast backend sends several between two reads, and
        every write costs a pass through the ASGI stack)."""
        lines = SseLines()
        # read to the end even after `[DONE]` (nothing more is sent): the connection then
        # goes back to the pool instead of being closed
        async for raw in self.response.chunks():
            out = [event for line in lines.feed(raw) if (event := self._event(line))]
            if out:
                yield b"".join(out)
        if not lines.done or self.result.finish_reason is None:
            raise IncompleteStream("the backend's stream ended before the reply was complete")

    def _event(self, line: bytes) -> bytes | None:
        """The client's event for one `data:` line of the backend (None: nothing to send)."""
        data = line[5:].strip()
        chunk = _parse(data)
        if "error" in chunk:
            raise ApiError(str(chunk["error"].get("message", "backend error")), status=502)
        self.result.feed(chunk)
        if _usage_only(chunk) and not self.wants_usage:
            return None
        fingerprint = self.result.fingerprint
        return b"data: %s\n\n" % chunk_json(chunk, data, self.wants_usage, fingerprint)

    def _account(self) -> None:
        usage = self.result.usage or {}
        self.metrics.count_tokens(
            usage.get("prompt_tokens"), usage.get("completion_tokens"), self.api
        )
        if self.result.first_token_at is not None:
            self.metrics.ttft.labels(self.api).observe(self.result.first_token_at - self.started)


class SseLines:
    """The `data:` lines of an SSE byte stream, fed as it is read (lines end in LF or CRLF;
    comments, event names and blank separators are skipped); `done` once `[DONE]` came."""

    def __init__(self) -> None:
        self._rest = b""
        self.done = False

    def feed(self, raw: bytes) -> list[bytes]:
        if self.done:
            return []
        *lines, self._rest = (self._rest + raw).split(b"\n")
        data = []
        for line in lines:
            if not line.startswith(b"data:"):
                continue
            if line[5:].strip() == b"[DONE]":
                self.done = True
                break
            data.append(line)
        return data


def _parse(data: bytes) -> dict[str, Any]:
    try:
        chunk = orjson.loads(data)
    except orjson.JSONDecodeError:
        chunk = _parse_strictly(data)
    if not isinstance(chunk, dict):
        raise IncompleteStream("the backend sent an unexpected event")
    return chunk


def _parse_strictly(data: bytes) -> Any:
    """What orjson refuses (an integer past 64 bits, NaN) as Python's json reads it."""
    try:
        return json.loads(data)
    except ValueError as exc:
        raise IncompleteStream(f"the backend sent an unreadable event: {data[:80]!r}") from exc


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
