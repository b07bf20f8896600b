"""Anthropic's error shape for every answer under `/v1/messages`.

The proxy's errors are OpenAI-shaped (`{"error": {message, type, param, code}}`); the
Anthropic SDKs and Claude Code read `{"type": "error", "error": {"type", "message"}}`, its
`type` one of Anthropic's error types for the status. This ASGI middleware sits outside the
access guard and the body limit, so their refusals (401, 413) are rewritten too; every
other path keeps OpenAI's shape. The status is never changed.
"""

from __future__ import annotations

import json
from typing import Any

from launcher.asgi import Scope

PREFIX = "/v1/messages"
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def error_type(status: int) -> str:
    """Anthropic's error type for an HTTP status."""
    return ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


def anthropic_error(status: int, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type(status), "message": message}}


def rewritten(status: int, body: bytes) -> bytes:
    """An OpenAI-shaped error body in Anthropic's shape (its message kept)."""
    try:
        value = json.loads(body)
        message = str(value["error"]["message"])
    except (ValueError, KeyError, TypeError):
        message = body.decode("utf-8", "replace")[:500] or "error"
    return json.dumps(anthropic_error(status, message)).encode()


def is_messages_path(path: str) -> bool:
    return path == PREFIX or path.startswith(PREFIX + "/")


class AnthropicErrors:
    """ASGI middleware: error answers under `/v1/messages` in Anthropic's shape."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not is_messages_path(scope["path"]):
            await self.app(scope, receive, send)
            return
        held: dict[str, Any] = {}
        chunks: list[bytes] = []

        async def reshape(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start" and message["status"] >= 400:
                held.update(message)
                return
            if not held or message["type"] != "http.response.body":
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            body = rewritten(held["status"], b"".join(chunks))
            headers = [(k, v) for k, v in held.get("headers", []) if k != b"content-length"]
            headers.append((b"content-length", str(len(body)).encode()))
            await send({**held, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, reshape)
