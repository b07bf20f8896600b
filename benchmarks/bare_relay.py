"""The least a Python relay can cost: an anchor for `proxy_overhead.py`'s streaming figures.

Run: python benchmarks/bare_relay.py PORT UPSTREAM (the backend's OpenAI base URL; its key
in the environment as BARE_RELAY_KEY)

A raw ASGI app on the stack `llmup serve` runs (uvicorn with httptools and uvloop, aiohttp's
client to the backend) that forwards a POST's body to the backend and relays the reply's
bytes as they come: no routing, validation, key, queue, parsing or metrics. What it costs
per stream is what any Python proxy on this machine pays at least; `proxy_overhead.py`
measures its streaming rate beside the direct and llmup rates, in the same run.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import uvicorn
from benchlib import LOOPBACK, answers, free_port, spawn, stop, wait_until

KEY_ENV = "BARE_RELAY_KEY"


class BareRelay:
    """The raw ASGI relay to `upstream` (see the module docstring)."""

    def __init__(self, upstream: str, key: str) -> None:
        self.upstream, self.key = upstream.rstrip("/"), key
        self.session: aiohttp.ClientSession | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self.lifespan(receive, send)
        elif scope["method"] == "GET":  # the readiness probe
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})
        else:
            await self.relay(scope, await read_body(receive), send)

    async def lifespan(self, receive: Any, send: Any) -> None:
        await receive()  # lifespan.startup
        self.session = aiohttp.ClientSession(headers={"Authorization": f"Bearer {self.key}"})
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        await self.session.close()
        await send({"type": "lifespan.shutdown.complete"})

    async def relay(self, scope: dict[str, Any], body: bytes, send: Any) -> None:
        assert self.session is not None
        url = self.upstream + scope["path"].removeprefix("/v1")
        json_type = {"Content-Type": "application/json"}
        async with self.session.post(url, data=body, headers=json_type) as reply:
            kind = reply.headers.get("content-type", "application/json").encode()
            start = {"status": reply.status, "headers": [(b"content-type", kind)]}
            await send({"type": "http.response.start", **start})
            async for chunk in reply.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})


async def read_body(receive: Any) -> bytes:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


@contextmanager
def bare_relay(upstream: str, key: str) -> Iterator[tuple[Any, str]]:
    """The relay in its own process in front of `upstream`; yields (process, base URL)."""
    port = free_port()
    command = [sys.executable, __file__, str(port), upstream]
    url = f"http://{LOOPBACK}:{port}"
    with tempfile.TemporaryDirectory(prefix="llmup-bare-") as tmp:
        proc = spawn(command, Path(tmp) / "relay.log", {KEY_ENV: key})
        try:
            wait_until(lambda: answers(url), proc, timeout=60)
            yield proc, url + "/v1"
        finally:
            stop(proc)


def main() -> None:
    port, upstream = int(sys.argv[1]), sys.argv[2]
    app = BareRelay(upstream, os.environ[KEY_ENV])
    uvicorn.run(app, host=LOOPBACK, port=port, log_level="warning", http="httptools")


if __name__ == "__main__":
    main()
