"""Which replica answered: a header on every response, and ids that name where they were made.

Every response of `llmup serve` (the API, its errors, the page, /health, the answers while
the model loads) says `X-Llmup-Replica: NAME` (`--replica-name`, default the host name), so a
client or a test behind a load balancer sees which replica served it.

Ids that llmup hands out and clients send back later (the Responses API's `resp_...`,
conversations' `conv_...`) carry the name of the replica that made them: `routed_id("resp",
"r1")` is `resp_r1_<48 hex>`. The load balancer (docker/haproxy.cfg) reads the name back
(`field(2,_)`) and sends the request to that replica, the one whose slot worker holds the
KV cache of that chain; when that replica is down it hashes the whole id instead, so the
chain settles on one other replica. A replica name has no "_" (see
`launcher.settings.REPLICA_NAME`), so the name is always the id's second field.
"""

from __future__ import annotations

import secrets
from typing import Any

REPLICA_HEADER = "X-Llmup-Replica"
ID_HEX_CHARS = 48  # the random part of an id, as long as OpenAI's


def routed_id(prefix: str, replica: str) -> str:
    """A new id for `prefix` ("resp", "conv", ...) made on `replica`."""
    return f"{prefix}_{replica}_{secrets.token_hex(ID_HEX_CHARS // 2)}"


def replica_of(value: str) -> str | None:
    """The replica an id was made on (None for an id not made by `routed_id`)."""
    parts = value.split("_")
    return parts[1] if len(parts) == 3 and parts[1] and parts[2] else None


class ReplicaHeader:
    """ASGI middleware: `X-Llmup-Replica` on every HTTP response of the wrapped app (outermost,
    so the 413 of the body limit and the 500 of the catch-all carry it too)."""

    def __init__(self, app: Any, *, name: str) -> None:
        self.app = app
        self.header = (REPLICA_HEADER.lower().encode(), name.encode())

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def named(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, named)
