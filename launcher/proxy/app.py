"""`create_app(settings, backend, sessions)`: the proxy, the only public surface of llmup.

Every error leaves as OpenAI-shaped JSON (`{"error": {message, type, param, code}}`) with
its proper status; request validation failures are 400 (OpenAI's status), not FastAPI's 422.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from launcher.errors import ProxyError
from launcher.protocol import error_body
from launcher.proxy import backend as backend_info
from launcher.proxy.auth import KeyRing, configured_keys
from launcher.proxy.limits import BodyLimitMiddleware, MetricsMiddleware
from launcher.proxy.page import mount_page
from launcher.proxy.routes import api, ops
from launcher.proxy.sessions import SessionStore
from launcher.proxy.state import ProxyState
from launcher.settings import Settings

log = logging.getLogger(__name__)

HTTP_CODES = {401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed"}


def create_app(settings: Settings, backend: Any, sessions: SessionStore) -> FastAPI:
    """The proxy app for `backend` (anything with base_url, state and restarts)."""
    state = ProxyState.build(settings, backend, sessions, KeyRing(configured_keys(settings.proxy)))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await state.upstream.aclose()

    app = FastAPI(
        title="llmup",
        summary="OpenAI-compatible Llama-2 server with per-session chat context",
        version="0.1.0",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.proxy = state
    app.include_router(api)
    app.include_router(ops)
    mount_page(app)
    _add_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.proxy.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    _watch_gauges(state)
    return app


def _watch_gauges(state: ProxyState) -> None:
    metrics = state.metrics

    def refresh() -> None:
        metrics.sessions.set(state.sessions.count())
        metrics.restarts.set(backend_info.restarts_of(state.backend))
        metrics.backend_up.set(1 if backend_info.is_ready(state.backend) else 0)
        metrics.queue_depth.set(state.admission.waiting)

    metrics.on_scrape(refresh)


def error_response(
    message: str,
    status: int,
    *,
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = error_body(message, status=status, code=code, param=param)
    return JSONResponse(body, status_code=status, headers=headers)


def _add_error_handlers(app: FastAPI) -> None:
    async def proxy_error(request: Request, exc: ProxyError) -> JSONResponse:
        if exc.status == 429:
            request.app.state.proxy.metrics.rejected.inc()
        return error_response(
            exc.message, exc.status, code=exc.code, param=exc.param, headers=exc.headers
        )

    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = describe_validation(exc)
        return error_response(message, 400, code="invalid_request", param=param)

    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(
            str(exc.detail), exc.status_code, code=HTTP_CODES.get(exc.status_code),
            headers=getattr(exc, "headers", None),
        )  # fmt: skip

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response("internal error in the llmup proxy", 500, code="internal_error")

    app.add_exception_handler(ProxyError, proxy_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)


def describe_validation(exc: RequestValidationError) -> tuple[str, str | None]:
    """One readable sentence and the offending field from pydantic's error list."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    where = f"`{param}`: " if param else ""
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return f"{where}{first.get('msg', 'invalid value')}{more}", param
