"""Plain ASGI helpers for llmup's HTTP apps that answer before (or without) a framework: the
proxy's middleware and the app that answers while the model loads. No FastAPI import here,
so the loading app stays light."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from launcher.errors import ApiError
from launcher.protocol import error_body

Scope = MutableMapping[str, Any]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def header(scope: Scope, name: bytes) -> str | None:
    """The first value of request header `name` (lower-case bytes) as text, or None."""
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None


async def send_error(send: Send, exc: ApiError, extra: Iterable[tuple[bytes, bytes]] = ()) -> None:
    """An OpenAI-shaped error sent straight on the ASGI channel (no route involved)."""
    body = json.dumps(
        error_body(exc.message, status=exc.status, code=exc.code, param=exc.param)
    ).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()]
    headers += list(extra)
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
