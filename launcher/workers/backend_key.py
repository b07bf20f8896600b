"""The per-run backend key, checked inside each worker llmup starts.

A backend listens on 127.0.0.1, where any local user could reach it and bypass the proxy's
API keys and session ownership. The supervisor hands each run a random key in the
environment (`runkey.KEY_ENV`); the worker wraps its ASGI app in `BackendKeyMiddleware`, which
answers 401 to any request whose `Authorization: Bearer` value is not that key, before the
app (or its model) sees the request. Every llmup worker calls `require_backend_key(app)`.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
from typing import Any

from launcher.protocol import error_body
from launcher.runkey import KEY_ENV

log = logging.getLogger(__name__)

Scope = dict[str, Any]


class BackendKeyMiddleware:
    """Pure ASGI: 401 (OpenAI-shaped) unless the request carries the run's key."""

    def __init__(self, app: Any, *, key: str) -> None:
        self.app = app
        self._expected = f"Bearer {key}".encode()

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or self._allowed(scope):
            await self.app(scope, receive, send)
            return
        body = json.dumps(
            error_body(
                "this backend only answers llmup's proxy: call the proxy instead",
                status=401,
                code="invalid_api_key",
            )
        ).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _allowed(self, scope: Scope) -> bool:
        given = next((v for k, v in scope.get("headers", ()) if k == b"authorization"), b"")
        return hmac.compare_digest(given, self._expected)


def require_backend_key(app: Any, environ: dict[str, str] | None = None) -> Any:
    """`app` behind the key from the environment; unchanged (and said so) when none is set,
    as when a developer runs a worker by hand."""
    key = (os.environ if environ is None else environ).get(KEY_ENV, "")
    if not key:
        log.warning("%s is not set: this worker answers anyone who can reach its port", KEY_ENV)
        return app
    return BackendKeyMiddleware(app, key=key)
