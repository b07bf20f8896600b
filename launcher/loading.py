"""What the listening port answers while the backend is pulled and loaded.

`llmup serve` binds its port first; until the model is ready, a small ASGI app answers on it
(as llama.cpp's own server does while it loads): `GET /health` is 503 with
`"status": "loading"` and the plan, and every other request gets an OpenAI-shaped 503
`model_loading` error with `Retry-After`, except the chat page's address `/`, which shows a
small page that reloads itself every few seconds until the chat page answers (what
llama.cpp's server does too). It runs in a uvicorn thread on a duplicate of the
listening socket; when the backend is ready it stops accepting (and closes only its
duplicate) and the proxy takes over the same socket, so connections made in between wait in
its backlog.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import socket
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn

from launcher.asgi import header
from launcher.listen import deadline_protocol
from launcher.protocol import error_body
from launcher.proxy.auth import KeyRing, configured_keys
from launcher.proxy.guard import AccessGuard, host_policy
from launcher.proxy.page_policy import PAGE_HEADERS
from launcher.proxy.replica import REPLICA_HEADER, ReplicaHeader
from launcher.settings import Settings

RETRY_AFTER_S = 5
LOADING_MESSAGE = "llmup is still loading the model; retry in a few seconds"
LOADING_PAGE = """<!doctype html>
<html lang="en">
<meta charset="utf-8">
<meta http-equiv="refresh" content="{seconds}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>llmup: loading</title>
<p>llmup is loading {model}. This page reloads every {seconds} seconds; the chat opens as soon
as the model is ready.</p>
</html>
"""


def loading_bodies(summary: dict[str, Any]) -> tuple[bytes, bytes, bytes]:
    """(the /health body, /health's body for a caller without a key when keys are set, every
    other route's error body) while loading."""
    status = {"status": "loading"}
    health = {
        **status,
        "backend": {"state": "loading", "restarts": 0},
        "model": summary.get("model"),
        "context": summary.get("context"),
        "plan": summary,
    }
    error = error_body(LOADING_MESSAGE, status=503, code="model_loading")
    return json.dumps(health).encode(), json.dumps(status).encode(), json.dumps(error).encode()


def replica_headers(settings: Settings) -> dict[str, str]:
    """The header naming this replica, for answers made outside the proxy's app."""
    return {REPLICA_HEADER: settings.proxy.replica_name}


def loading_page(summary: dict[str, Any]) -> bytes:
    """The page at `/` while loading: no script, a meta refresh (allowed by the page policy)."""
    model = html.escape(str(summary.get("model") or "the model"))
    return LOADING_PAGE.format(seconds=RETRY_AFTER_S, model=model).encode()


def loading_app(
    summary: dict[str, Any],
    keys: KeyRing | None = None,
    allowed_hosts: Iterable[str] = (),
    *,
    replica: str,
) -> Any:
    """A bare ASGI app (no framework to import while the proxy's own app is preloaded),
    behind the proxy's Host check; /health shows the plan only to a key holder. Every
    answer, the guard's 400 and 401 too, names the replica."""
    keys = keys or KeyRing([])
    health, bare_health, error = loading_bodies(summary)
    retry = (b"retry-after", str(RETRY_AFTER_S).encode())
    as_json = [(b"content-type", b"application/json"), retry]
    page = loading_page(summary)
    as_page = [(b"content-type", b"text/html; charset=utf-8"), retry] + [
        (name.lower().encode(), value.encode()) for name, value in PAGE_HEADERS.items()
    ]

    answers = {"/": (page, as_page), "/health": (health, as_json)}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body, headers = answers.get(scope["path"], (error, as_json))
        if body is health and not keys.may_see(header(scope, b"authorization")):
            body = bare_health
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    hosts = host_policy(keys, allowed_hosts)
    guarded = AccessGuard(app, keys=keys, hosts=hosts, needs_key=lambda path: False)
    return ReplicaHeader(guarded, name=replica)


class LoadingServer(uvicorn.Server):
    """uvicorn's server, letting go of the socket as soon as `release()` is called (the
    proxy waits for that on every start): its main loop waits on an event instead of
    uvicorn's 0.1 s tick (and wakes for nothing else: no CPU taken from the model's load),
    and it says it stopped accepting (`released`) before uvicorn's own 0.1 s wait for
    connections."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.released = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._exit: asyncio.Event | None = None

    def release(self) -> None:
        """Stop accepting and shut down; from any thread."""
        self.should_exit = True
        loop, event = self._loop, self._exit
        if loop is not None and event is not None:
            with contextlib.suppress(RuntimeError):  # its loop already closed
                loop.call_soon_threadsafe(event.set)

    async def main_loop(self) -> None:
        self._exit = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        if not self.should_exit:  # release() may have come before the loop ran
            await self._exit.wait()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()  # no new connection reaches this app from here on
        self.released.set()
        await super().shutdown(sockets)


@contextmanager
def answering_while_loading(
    listener: Any, settings: Settings, summary: dict[str, Any]
) -> Iterator[None]:
    """Serve the loading app on `listener` for the duration of the block."""
    s = settings.serve
    keys = KeyRing(configured_keys(settings.proxy))
    config = uvicorn.Config(
        loading_app(
            summary, keys, settings.proxy.allowed_hosts, replica=settings.proxy.replica_name
        ),
        lifespan="off",
        log_level="warning",
        http=deadline_protocol(
            s.header_timeout_s, s.body_timeout_s, headers=replica_headers(settings)
        ),
        timeout_graceful_shutdown=1,
    )
    server = LoadingServer(config)
    listener.listen(config.backlog)  # from now on a connection waits, never is refused
    sock = listener.dup()  # uvicorn closes the sockets it served; the proxy needs this one
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="llmup-loading", daemon=True
    )
    thread.start()
    try:
        yield
    finally:
        server.release()  # its open connections close in its own thread
        while thread.is_alive() and not server.released.wait(0.01):
            server.release()  # again, in case its loop was not running yet the first time
