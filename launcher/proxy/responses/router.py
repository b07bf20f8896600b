"""The Responses API's handlers: authenticate, validate, hand over to `serving`. `ROUTES`
joins `routes.OPENAI_ROUTES`, so each is served under `/v1` and at the top level."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from fastapi import Depends, Query, Request
from fastapi.responses import Response

from launcher.proxy.deps import authenticate
from launcher.proxy.responses import serving
from launcher.proxy.responses.models import CreateResponse, ResponseInput


async def create_response(
    request: Request, body: CreateResponse, owner: str = Depends(authenticate)
) -> Response:
    return await serving.create(request, body, owner)


async def count_input_tokens(
    request: Request, body: ResponseInput, owner: str = Depends(authenticate)
) -> dict[str, Any]:
    return await serving.input_tokens(request, body, owner)


async def get_response(
    request: Request, response_id: str, owner: str = Depends(authenticate)
) -> dict[str, Any]:
    return await serving.retrieve(request, response_id, owner)


async def delete_response(
    request: Request, response_id: str, owner: str = Depends(authenticate)
) -> dict[str, Any]:
    return await serving.delete(request, response_id, owner)


async def list_input_items(
    request: Request,
    response_id: str,
    owner: str = Depends(authenticate),
    limit: int = Query(default=20, ge=1, le=100),
    order: Literal["asc", "desc"] = "desc",
    after: str | None = None,
) -> dict[str, Any]:
    return await serving.list_input_items(
        request, response_id, owner, limit=limit, order=order, after=after
    )


ROUTES: tuple[tuple[str, str, Callable[..., Any], Any], ...] = (
    ("POST", "/responses", create_response, None),
    ("POST", "/responses/input_tokens", count_input_tokens, None),
    ("GET", "/responses/{response_id}", get_response, None),
    ("DELETE", "/responses/{response_id}", delete_response, None),
    ("GET", "/responses/{response_id}/input_items", list_input_items, None),
)
