"""Limits in front of the backend: request body size and a bounded queue.

The body limit is an ASGI middleware so an oversized body is refused before anything parses
it: a declared Content-Length over the limit is answered at once, and a chunked body is
read only up to the limit. The queue admits at most `max_inflight + queue_size` generation
requests, and at most `max_requests_per_key` of one API key; the next one gets 429 with
Retry-After instead of waiting without bound. Keys take turns at the backend.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from launcher.api_errors import send_error
from launcher.errors import BodyTooLargeError, KeyLimitError, QueueFullError
from launcher.proxy.metrics import Metrics

BODY_METHODS = {"POST", "PUT", "PATCH"}


class BodyLimitMiddleware:
    """413 for a body over `max_bytes`, decided before the app sees a byte of it."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> BodyTooLargeError:
        return BodyTooLargeError(
            f"request body is larger than the {self.max_bytes}-byte limit "
            "(LLMUP_PROXY__MAX_BODY_BYTES)"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await send_error(send, self._too_large())
            return
        messages = await self._read_body(receive)
        if messages is None:
            await send_error(send, self._too_large())
            return
        await self.app(scope, _replay(messages, receive), send)

    async def _read_body(self, receive: Receive) -> list[Message] | None:
        """The body's messages, or None as soon as they pass the limit."""
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                return messages  # a disconnect: let the app see it
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return None
            if not message.get("more_body", False):
                return messages


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """Hand the buffered body to the app, then the live channel (for disconnects)."""
    pending = list(messages)

    async def replayed() -> Message:
        return pending.pop(0) if pending else await receive()

    return replayed


class MetricsMiddleware:
    """Counts every response by route template and status, and times it to its last byte."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), [500]

        async def watched(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watched)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.requests.labels(route, str(status[0])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)


class Admission:
    """The bounded queue: `max_inflight` requests at the backend, `queue_size` waiting, and
    at most `per_key` of them (queued or running) for one owner (an API key).

    Places at the backend go to owners in turn (round robin over the owners that wait,
    first come first served within one), so a key that queues many requests cannot make
    another key's request wait behind all of them.
    """

    def __init__(
        self,
        *,
        max_inflight: int,
        queue_size: int,
        retry_after_s: int,
        per_key: int | None = None,
        on_reject: Callable[[], None] = lambda: None,
    ) -> None:
        self.capacity = max_inflight + queue_size
        self.per_key = per_key or self.capacity
        self.retry_after_s = retry_after_s
        self.on_reject = on_reject
        self.admitted = 0
        self.total = 0  # every request ever admitted (what an idle-time measurement watches)
        self.inflight = 0
        self._free = max_inflight
        self._by_owner: Counter[str] = Counter()
        self._waiting: OrderedDict[str, deque[asyncio.Future[None]]] = OrderedDict()

    @property
    def waiting(self) -> int:
        return self.admitted - self.inflight

    def activity(self) -> tuple[int, int]:
        """(requests admitted so far, requests queued or running now): read from any thread."""
        return self.total, self.admitted

    @asynccontextmanager
    async def admit(self, owner: str = "") -> AsyncIterator[None]:
        """Take a place in the queue, or raise a 429: QueueFullError when there is none,
        KeyLimitError when this owner holds `per_key` places already."""
        self._check_room(owner)
        self.admitted += 1
        self.total += 1
        self._by_owner[owner] += 1
        try:
            yield
        finally:
            self.admitted -= 1
            self._by_owner[owner] -= 1
            if not self._by_owner[owner]:
                del self._by_owner[owner]

    def _check_room(self, owner: str) -> None:
        retry = {"Retry-After": str(self.retry_after_s)}
        if self.admitted >= self.capacity:
            self.on_reject()
            raise QueueFullError(
                f"the server is busy ({self.admitted} requests queued or running); retry later",
                headers=retry,
            )
        if self._by_owner[owner] >= self.per_key:
            self.on_reject()
            raise KeyLimitError(
                f"this API key has {self.per_key} requests queued or running, the most one key "
                "may have at once (LLMUP_PROXY__MAX_REQUESTS_PER_KEY); retry when one ends",
                code="requests_per_key_exceeded",
                headers=retry,
            )

    @asynccontextmanager
    async def slot(self, owner: str = "") -> AsyncIterator[None]:
        """Wait for one of the `max_inflight` places at the backend (owners take turns)."""
        await self._acquire(owner)
        self.inflight += 1
        try:
            yield
        finally:
            self.inflight -= 1
            self._release()

    async def _acquire(self, owner: str) -> None:
        if self._free and not self._waiting:
            self._free -= 1
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(owner, deque()).append(future)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self._release()  # granted just as it was cancelled: hand the place on
            else:
                self._forget(owner, future)
            raise

    def _release(self) -> None:
        """A place is free: to the owner whose turn it is (then to the back of the line)."""
        self._free += 1
        while self._free and self._waiting:
            owner, futures = self._waiting.popitem(last=False)
            future = futures.popleft()
            if futures:
                self._waiting[owner] = futures
            if not future.done():
                self._free -= 1
                future.set_result(None)

    def _forget(self, owner: str, future: asyncio.Future[None]) -> None:
        futures = self._waiting.get(owner)
        if futures is not None and future in futures:
            futures.remove(future)
            if not futures:
                del self._waiting[owner]
