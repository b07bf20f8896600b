"""`/v1/responses` routes: authenticate, validate, hand over to `serving`."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from launcher.proxy.responses import serving
from launcher.proxy.responses.models import CreateResponse, ResponseInput
from launcher.proxy.routes import ERRORS, authenticate

router = APIRouter(prefix="/v1", responses=ERRORS, tags=["responses"])


@router.post("/responses", response_model=None)
async def create_response(
    request: Request, body: CreateResponse, owner: str = Depends(authenticate)
) -> Response:
    return await serving.create(request, body, owner)


@router.post("/responses/input_tokens")
async def count_input_tokens(
    request: Request, body: ResponseInput, owner: str = Depends(authenticate)
) -> dict[str, Any]:
    return await serving.input_tokens(request, body, owner)


@router.get("/responses/{response_id}")
async def get_response(
    request: Request, response_id: str, owner: str = Depends(authenticate)
) -> dict[str, Any]:
    return await serving.retrieve(request, response_id, owner)


@router.delete("/responses/{response_id}")
async def delete_response(
    request: Request, response_id: str, owner: str = Depends(authenticate)
) -> dict[str, Any]:
    return await serving.delete(request, response_id, owner)


@router.get("/responses/{response_id}/input_items")
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
