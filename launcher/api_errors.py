"""OpenAI-shaped errors for every FastAPI app llmup serves (the proxy and its workers).

One home for what each app needs to answer an error the way OpenAI's API does: the
handlers (llmup's own `ApiError`, request validation as a 400 rather than FastAPI's 422,
HTTP errors such as an unknown route), the readable summary of a validation failure, and a
last-resort middleware for bugs. That middleware answers 500 with `Connection: close` and
does not re-raise: Starlette's own catch-all re-raises after answering, and uvicorn then
drops the keep-alive connection, so a client's next request on it fails with ECONNRESET.

Imported only by modules that build a FastAPI app; core modules never import it.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from launcher.asgi import send_error
from launcher.errors import ApiError
from launcher.protocol import error_body

log = logging.getLogger(__name__)

HTTP_CODES = {401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed"}
INTERNAL_MESSAGE = "internal error in the llmup server; the request was not completed, retry"
# pydantic error types -> OpenAI's `error.code` for an invalid parameter
_TYPE_CODES = {"missing": "missing_required_parameter", "extra_forbidden": "unknown_parameter"}
_VALUE_ERRORS = re.compile(
    r"greater|less|too_short|too_long|pattern|literal|enum|value_error|multiple_of|"
    r"union_tag|finite|assertion|string_unicode"
)
# labels pydantic puts in `loc` for union members and tags: not part of the field's path
_LOC_LABEL = re.compile(r"^(str|int|float|bool|none|.*\[.*\]|[a-z-]+-[a-z]+)$")
_ROLE_TAGS = {"system", "developer", "user", "assistant", "tool", "function"}


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


def describe_validation(errors: list[Any]) -> tuple[str, str | None, str | None]:
    """(message, param, code) for pydantic's error list: its first problem, readable."""
    if not errors:
        return "invalid request", None, "invalid_value"
    first = errors[0]
    kind = str(first.get("type", ""))
    if kind == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return f"the request body is not valid JSON ({detail})".replace(" ()", ""), None, None
    if kind == "invalid_json_value":  # protocol.check_plain_json names the place itself
        return str(first.get("msg")), (first.get("ctx") or {}).get("param"), "invalid_value"
    param = error_param(first.get("loc", ()))
    where = f"`{param}`: " if param else ""
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return f"{where}{first.get('msg', 'invalid value')}{more}", param, _code_for(kind)


def error_param(loc: Any) -> str | None:
    """The field a validation error is about, as `messages.0.content` (no union labels)."""
    parts: list[str] = []
    for item in loc:
        if item == "body" and not parts:
            continue
        text = str(item)
        after_index = bool(parts) and parts[-1].isdigit()
        if isinstance(item, str) and (
            _LOC_LABEL.match(text) or (after_index and text in _ROLE_TAGS)
        ):
            continue
        parts.append(text)
    return ".".join(parts) or None


def _code_for(kind: str) -> str:
    if kind in _TYPE_CODES:
        return _TYPE_CODES[kind]
    return "invalid_value" if _VALUE_ERRORS.search(kind) else "invalid_type"


def http_error_message(request: Request, exc: StarletteHTTPException) -> str:
    if exc.status_code == 404 and exc.detail == "Not Found":
        return f"Invalid URL ({request.method} {request.url.path})"
    if exc.status_code == 405:
        return f"method {request.method} is not allowed on {request.url.path}"
    return str(exc.detail)


def install_error_handlers(app: FastAPI) -> None:
    """Handlers for llmup's errors, validation failures and HTTP errors, plus the
    catch-all middleware (add further middleware after this call: it must stay innermost)."""

    async def proxy_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(
            exc.message, exc.status, code=exc.code, param=exc.param, headers=exc.headers
        )

    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param, code = describe_validation(list(exc.errors()))
        return error_response(message, 400, code=code, param=param)

    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(
            http_error_message(request, exc), exc.status_code,
            code=HTTP_CODES.get(exc.status_code), headers=getattr(exc, "headers", None),
        )  # fmt: skip

    app.add_exception_handler(ApiError, proxy_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_middleware(CatchAllMiddleware)


class CatchAllMiddleware:
    """A bug answers 500 (OpenAI-shaped, `Connection: close`) instead of a dropped socket."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception:
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if started:  # mid-response: nothing sane can follow; let the server end it
                raise
            error = ApiError(INTERNAL_MESSAGE, status=500, code="internal_error")
            await send_error(send, error, [(b"connection", b"close")])
