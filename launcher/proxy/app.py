"""`create_app(settings, backend, sessions)`: the proxy, the only public surface of llmup.

Every error leaves as OpenAI-shaped JSON (`{"error": {message, type, param, code}}`) with
its proper status (see `launcher.api_errors`); request validation failures are 400
(OpenAI's status), not FastAPI's 422. With `proxy.cors_origins` set, web pages of those
origins may call the API from a browser (CORS, off by default).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware

from launcher.api_errors import install_error_handlers
from launcher.errors import ApiError
from launcher.proxy.auth import KeyRing, configured_keys
from launcher.proxy.guard import AccessGuard, host_policy
from launcher.proxy.limits import BodyLimitMiddleware, MetricsMiddleware
from launcher.proxy.messages.errors import AnthropicErrors
from launcher.proxy.messages.router import router as messages_router
from launcher.proxy.page import mount_page
from launcher.proxy.replica import REPLICA_HEADER, ReplicaHeader
from launcher.proxy.routes import mount_api, ops
from launcher.proxy.state import ProxyState
from launcher.proxy.store import SessionStore
from launcher.proxy.turns import DROPPED_HEADER, REPLAYED_HEADER, REWOUND_HEADER
from launcher.served import ServedModel
from launcher.settings import Settings

log = logging.getLogger(__name__)


def create_app(settings: Settings, backend: ServedModel, sessions: SessionStore) -> FastAPI:
    """The proxy app in front of `backend`."""
    state = ProxyState.build(settings, backend, sessions, KeyRing(configured_keys(settings.proxy)))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await state.aclose()

    app = FastAPI(
        title="llmup",
        summary="OpenAI-compatible Llama-2 server with per-session chat context",
        version="0.1.0",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,  # served by `routes.openapi_schema`, behind the API key
        lifespan=lifespan,
    )
    app.state.proxy = state
    mount_api(app)
    app.include_router(messages_router)  # Anthropic's clients call {base}/v1/messages
    app.include_router(ops)
    mount_page(app)
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.proxy.max_body_bytes)
    # outside the body limit: who may call is settled before a byte of the body is read
    hosts = host_policy(state.keys, settings.proxy.allowed_hosts)
    app.add_middleware(AccessGuard, keys=state.keys, hosts=hosts)
    app.add_middleware(AnthropicErrors)  # outside the guard: its 401 in Anthropic's shape too
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    # outside the guard: a browser's preflight carries no key, so it is answered first
    if settings.proxy.cors_origins:
        app.add_middleware(CORSMiddleware, **cors_options(settings.proxy.cors_origins))
    app.add_middleware(ReplicaHeader, name=settings.proxy.replica_name)  # outermost: every answer
    _watch_gauges(state)
    return app


def warm_up(app: FastAPI) -> None:
    """Build what FastAPI builds on its first request (the middleware stack, every route's
    resolved state: ~70 ms on 2 cores) by routing one in-process request for a path no
    route has past the middlewares (nothing answers or counts it), so that the first
    client does not wait for it. Call it with no event loop running in this thread."""
    app.middleware_stack = app.build_middleware_stack()
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
        "scheme": "http", "path": WARM_UP_PATH, "raw_path": WARM_UP_PATH.encode(),
        "root_path": "", "query_string": b"", "headers": [], "client": ("127.0.0.1", 0),
        "server": ("127.0.0.1", 0), "app": app, "state": {},
    }  # fmt: skip

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        return None

    with contextlib.suppress(HTTPException):  # the router's 404, meant for its handler
        asyncio.run(app.router(scope, receive, send))


WARM_UP_PATH = "/.llmup-warm-up"  # matched against every route, answered by none


# What a browser page may send: the key, JSON, the session and retry headers, and the
# openai SDKs' own `x-stainless-*` headers (their browser builds send them)
CORS_HEADERS = (
    "Authorization", "Content-Type", "X-Session-Id", "Idempotency-Key",
    "X-Stainless-Arch", "X-Stainless-Lang", "X-Stainless-OS", "X-Stainless-Package-Version",
    "X-Stainless-Runtime", "X-Stainless-Runtime-Version", "X-Stainless-Retry-Count",
    "X-Stainless-Timeout",
)  # fmt: skip
CORS_EXPOSED = (DROPPED_HEADER, REWOUND_HEADER, REPLAYED_HEADER, REPLICA_HEADER, "Retry-After")


def cors_options(origins: list[str]) -> dict[str, Any]:
    """Starlette's CORSMiddleware for the listed origins only (`*`: any): a preflight from
    another origin is refused, and no other origin's page may read a reply."""
    return {
        "allow_origins": origins,
        "allow_methods": ("GET", "POST", "DELETE", "OPTIONS"),
        "allow_headers": CORS_HEADERS,
        "expose_headers": CORS_EXPOSED,
        "max_age": 600,
    }


def _watch_gauges(state: ProxyState) -> None:
    metrics = state.metrics

    def refresh() -> None:
        try:
            metrics.sessions.set(state.sessions.count())
        except (ApiError, sqlite3.Error) as exc:  # a broken store must not take the metrics
            log.warning("cannot count sessions: %s", exc)
        metrics.restarts.set(state.backend.restarts)
        metrics.backend_up.set(1 if state.ready else 0)
        metrics.backend_state.clear()  # one series: the state it is in now
        metrics.backend_state.labels(state.backend.state).set(1)
        supervision = state.backend.supervision
        metrics.health_failures.set(supervision.get("failed_health_checks", 0))
        metrics.unhealthy_restarts.set(supervision.get("unhealthy_restarts", 0))
        metrics.queue_depth.set(state.admission.waiting)

    metrics.on_scrape(refresh)
