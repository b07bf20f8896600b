"""HTTP calls to the backend, and the mapping of its failures to proxy errors.

The backend listens on 127.0.0.1, so the client ignores proxy environment variables, and it
answers only requests that carry its per-run key: every call sends the backend's
`auth_headers` (empty for a backend without a key, e.g. a test's StaticBackend). A
backend that cannot be reached, or that drops the connection, is "unavailable" (503, the
supervisor is probably restarting it); a 4xx keeps its status and message; a 5xx becomes a
502, so a backend bug is never mistaken for the proxy's own. A dropped connection is a
`BackendDroppedError`, so the caller can tell `crashes` which request saw the crash.

The client is aiohttp's: on this hop (a 1-token chat to a worker on the same machine) it
costs about a quarter of httpx's CPU per request and half of it per streamed chunk (its
response parser is C, and a read waits on the protocol's buffer rather than entering a
cancel scope per read); see benchmarks/README.md, "Proxy overhead".
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from launcher.errors import (
    ApiError,
    BackendDroppedError,
    BackendFailedError,
    BackendUnavailableError,
    NotFoundError,
)
from launcher.served import ServedModel

log = logging.getLogger(__name__)

# What a call to the backend can raise besides its reply: aiohttp's errors and its timeouts
TRANSPORT_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError)
CONNECT_TIMEOUT_S = 5.0
PASSED_STATUSES = {400: 400, 404: 404, 413: 413, 422: 400, 429: 429}


def dropped(exc: BaseException) -> bool:
    """The backend closed a connection in the middle of a request: it crashed (a timeout or a
    refused connection is something else)."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return False
    return isinstance(
        exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError, aiohttp.ClientOSError)
    )


class Stream:
    """A streamed reply of the backend: its body as it arrives, then `aclose`."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response

    def chunks(self) -> AsyncIterator[bytes]:
        """The body's bytes as each read brings them."""
        return self.response.content.iter_any()

    async def aclose(self) -> None:
        """Back to the pool when read to its end; else the connection is closed, which stops
        the backend's generation."""
        if self.response.content.at_eof():
            self.response.release()
        else:
            self.response.close()


class Upstream:
    """One pooled async client to the backend; `base_url` is read per call (it may move).

    The session is made on first use, in the event loop that serves the proxy (aiohttp
    binds a session to its loop)."""

    def __init__(self, backend: ServedModel, *, timeout_s: float, retry_after_s: int) -> None:
        self.backend = backend
        self.retry_after_s = retry_after_s
        self.timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=CONNECT_TIMEOUT_S, sock_read=timeout_s
        )
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=256),
                timeout=self.timeout,
                headers=dict(self.backend.auth_headers),  # the per-run backend key
                trust_env=False,
                skip_auto_headers=("Accept-Encoding",),  # a reply never worth compressing
            )
        return self._session

    def url(self, path: str) -> str:
        return str(self.backend.base_url).rstrip("/") + path

    def unavailable(
        self, why: str, *, error: type[BackendUnavailableError] = BackendUnavailableError
    ) -> BackendUnavailableError:
        return error(
            f"the model backend is unavailable ({why}); retry in a few seconds",
            headers={"Retry-After": str(self.retry_after_s)},
        )

    async def post_json(
        self, path: str, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> dict[str, Any]:
        """POST and return the JSON reply; any failure raised as a ApiError."""
        return await self.call_json("POST", path, body=body, headers=headers) or {}

    async def call_json(
        self,
        method: str,
        path: str,
        *,
        body: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        missing_ok: bool = False,
    ) -> dict[str, Any] | None:
        """One call and its JSON reply; any failure raised as a ApiError, except a 404
        with `missing_ok` (None: the backend has no such route)."""
        try:
            async with self.session.request(
                method, self.url(path), json=body, headers=headers
            ) as response:
                status, content = response.status, await response.read()
        except TRANSPORT_ERRORS as exc:
            raise self.transport_error(exc) from exc
        if missing_ok and status == 404:
            return None
        if status >= 300:
            raise error_from_reply(status, content)
        return parse_json(content)

    async def open_stream(
        self, path: str, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> Stream:
        """Start a streamed POST; the caller owns (and must close) the stream."""
        try:
            response = await self.session.post(self.url(path), json=body, headers=headers)
        except TRANSPORT_ERRORS as exc:
            raise self.transport_error(exc) from exc
        if response.status >= 300:
            try:
                content = await response.read()
            except TRANSPORT_ERRORS as exc:
                raise self.transport_error(exc) from exc
            finally:
                response.close()
            raise error_from_reply(response.status, content)
        return Stream(response)

    def transport_error(self, exc: BaseException) -> ApiError:
        connecting = isinstance(exc, aiohttp.ConnectionTimeoutError)
        if isinstance(exc, asyncio.TimeoutError) and not connecting:
            return BackendFailedError(
                "the model backend did not answer in time", status=504, code="backend_timeout"
            )
        log.warning("backend request failed: %r", exc)
        if dropped(exc):
            return self.unavailable(type(exc).__name__, error=BackendDroppedError)
        return self.unavailable(type(exc).__name__)

    async def get_json(self, path: str) -> dict[str, Any] | None:
        """GET a JSON document; None when the backend has no such route (404)."""
        return await self.call_json("GET", path, missing_ok=True)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


def parse_json(content: bytes) -> dict[str, Any]:
    try:
        value = json.loads(content)
    except ValueError as exc:
        raise BackendFailedError("the model backend sent a reply that is not JSON") from exc
    if not isinstance(value, dict):
        raise BackendFailedError("the model backend sent an unexpected reply")
    return value


def error_from_reply(status: int, content: bytes) -> ApiError:
    """A backend error reply as a ApiError, keeping its message and OpenAI code."""
    message, code, param = _describe(content)
    if status >= 500:  # its details stay in the log: they are the backend's internals
        log.warning("backend error %d: %s", status, message)
        return BackendFailedError(
            f"the model backend failed on this request (HTTP {status}); its log has the details"
        )
    if status == 404:
        return NotFoundError(message, code=code or "not_found", param=param)
    return ApiError(message, code=code, param=param, status=PASSED_STATUSES.get(status, 400))


def _describe(content: bytes) -> tuple[str, str | None, str | None]:
    """(message, code, param) from an OpenAI error body, FastAPI's `detail`, or raw text."""
    try:
        body = json.loads(content)
    except ValueError:
        return content.decode("utf-8", "replace")[:500] or "no details", None, None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return str(error.get("message") or "error"), error.get("code"), error.get("param")
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, list) and detail and isinstance(detail[0], dict):
        first = detail[0]
        loc = ".".join(str(p) for p in first.get("loc", [])[1:]) or None
        return str(first.get("msg", "invalid request")), "invalid_value", loc
    return str(detail or body)[:500], None, None
