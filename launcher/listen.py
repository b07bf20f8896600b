"""The public listener of `llmup serve`: bound before anything loads, reading requests with
deadlines, and shut down so that nothing in flight can hold the process.

- `open_listener` binds host:port (IPv4, IPv6 or a name) up front, so a bad address or a busy
  port is one line before the model is even planned; uvicorn then serves that socket.
- `ReadDeadlineProtocol` is uvicorn's httptools protocol (llhttp, the C parser of Node.js:
  uvicorn's own choice when httptools is installed, and several times cheaper per request
  than its pure-Python h11 one) with two deadlines uvicorn lacks: the request headers must
  arrive within `header_timeout_s` of the first byte (else 408 and close), the body within
  `body_timeout_s` of the headers (else close). Without them a client trickling bytes holds
  a connection, and a slot of the server, for ever.
- `StoppingServer` runs `on_shutdown` (stop the backend) in a thread as the shutdown begins:
  streams waiting on a runaway generation then end with an error event at once, instead of
  keeping uvicorn's graceful wait open; uvicorn cancels what remains after its timeout.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Callable
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from launcher.errors import UsageError
from launcher.netaddr import bind_socket

TIMEOUT_HEAD = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"connection: close\r\ncontent-length: 24\r\n"
)
TIMEOUT_BODY = b"\r\nrequest not sent in time"


def open_listener(host: str, port: int) -> socket.socket:
    """The bound (not yet listening) socket for host:port, or a UsageError in one line."""
    try:
        return bind_socket(host, port)
    except socket.gaierror as exc:
        raise UsageError(
            f"cannot listen on {host!r}: {exc.strerror}; pass --host with an IP address of "
            "this machine (127.0.0.1, ::1, 0.0.0.0, ::) or a name it resolves"
        ) from None
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise UsageError(
                f"port {port} on {host} is already in use; pick another with --port"
            ) from None
        hint = "ports below 1024 need root" if exc.errno == errno.EACCES else "check --host"
        raise UsageError(f"cannot listen on {host} port {port}: {exc.strerror}; {hint}") from None


class ReadDeadlineProtocol(HttpToolsProtocol):
    """httptools with a deadline on reading each request (see the module docstring): the
    parser's callbacks move it from the headers to the body to none."""

    header_timeout_s: float = 20.0
    body_timeout_s: float = 60.0
    extra_headers: bytes = b""  # raw "name: value\r\n" lines added to the 408

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._deadline: asyncio.TimerHandle | None = None
        self._reading = "headers"
        super().connection_made(transport)
        self._arm(self.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._deadline is None:  # the next request on a kept-alive connection
            self._reading = "headers"
            self._arm(self.header_timeout_s)

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._reading = "body"
        self._arm(self.body_timeout_s)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._reading = "done"
        self._disarm()

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        self.logger.warning("closing a connection: its %s did not arrive in time", self._reading)
        if self.cycle is None or not self.cycle.response_started:
            self.transport.write(TIMEOUT_HEAD + self.extra_headers + TIMEOUT_BODY)
        self.transport.close()


def deadline_protocol(
    header_timeout_s: float, body_timeout_s: float, *, headers: dict[str, str] | None = None
) -> type[HttpToolsProtocol]:
    """ReadDeadlineProtocol with these deadlines (uvicorn builds one per connection); its
    408 carries `headers` too (the replica's name)."""
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    attrs = {
        "header_timeout_s": header_timeout_s,
        "body_timeout_s": body_timeout_s,
        "extra_headers": extra.encode("latin-1"),
    }
    return type("ReadDeadlineProtocol", (ReadDeadlineProtocol,), attrs)


class StoppingServer(uvicorn.Server):
    """uvicorn.Server whose shutdown starts by running `on_shutdown` in a thread."""

    def __init__(self, config: uvicorn.Config, *, on_shutdown: Callable[[], Any]) -> None:
        super().__init__(config)
        self.on_shutdown = on_shutdown

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        stopping = asyncio.get_running_loop().run_in_executor(None, self.on_shutdown)
        await super().shutdown(sockets)
        await stopping
