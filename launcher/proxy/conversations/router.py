"""`/v1/conversations` routes: authenticate, validate, hand over to `serving`."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Request

from launcher.proxy.conversations import serving
from launcher.proxy.conversations.models import (
    CreateConversation,
    CreateItems,
    UpdateConversation,
)
from launcher.proxy.routes import ERRORS, authenticate

router = APIRouter(prefix="/v1", responses=ERRORS, tags=["conversations"])


@router.post("/conversations")
async def create_conversation(
    request: Request, body: CreateConversation, owner: str = Depends(authenticate)
) -> dict[str, Any]:
    return await serving.create(request, body, owner)


@router.get("/conversations/{conversation_id}")
async def get_conversation(
    request: Request, conversation_id: str, owner: str = Depends(authenticate)
) -> dict[str, Any]:
    return await serving.retrieve(request, conversation_id, owner)


@router.post("/conversations/{conversation_id}")
async def update_conversation(
    request: Request,
    conversation_id: str,
    body: UpdateConversation,
    owner: str = Depends(authenticate),
) -> dict[str, Any]:
    return await serving.update(request, conversation_id, body, owner)


@router.delete("/conversations/{conversation_id}")
async def delete_conversation(
    request: Request, conversation_id: str, owner: str = Depends(authenticate)
) -> dict[str, Any]:
    return await serving.delete(request, conversation_id, owner)


@router.get("/conversations/{conversation_id}/items")
async def list_items(
    request: Request,
    conversation_id: str,
    owner: str = Depends(authenticate),
    limit: int = Query(default=20, ge=1, le=100),
    order: Literal["asc", "desc"] = "desc",
    after: str | None = None,
) -> dict[str, Any]:
    return await serving.list_items(
        request, conversation_id, owner, limit=limit, order=order, after=after
    )


@router.post("/conversations/{conversation_id}/items")
async def add_items(
    request: Request, conversation_id: str, body: CreateItems, owner: str = Depends(authenticate)
) -> dict[str, Any]:
    return await serving.add_items(request, conversation_id, body.items, owner)


@router.get("/conversations/{conversation_id}/items/{item_id}")
async def get_item(
    request: Request, conversation_id: str, item_id: str, owner: str = Depends(authenticate)
) -> dict[str, Any]:
    return await serving.get_item(request, conversation_id, item_id, owner)
