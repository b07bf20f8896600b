"""The Conversations API's handlers: authenticate, validate, hand over to `serving`.
`ROUTES` joins `routes.OPENAI_ROUTES`, so each is served under `/v1` and at the top level."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from fastapi import Depends, Query, Request

from launcher.proxy.conversations import serving
from launcher.proxy.conversations.models import (
    CreateConversation,
    CreateItems,
    UpdateConversation,
)
from launcher.proxy.deps import authenticate


async def create_conversation(
    request: Request, body: CreateConversation, owner: str = Depends(authenticate)
) -> dict[str, Any]:
    return await serving.create(request, body, owner)


async def get_conversation(
    request: Request, conversation_id: str, owner: str = Depends(authenticate)
) -> dict[str, Any]:
    return await serving.retrieve(request, conversation_id, owner)


async def update_conversation(
    request: Request,
    conversation_id: str,
    body: UpdateConversation,
    owner: str = Depends(authenticate),
) -> dict[str, Any]:
    return await serving.update(request, conversation_id, body, owner)


async def delete_conversation(
    request: Request, conversation_id: str, owner: str = Depends(authenticate)
) -> dict[str, Any]:
    return await serving.delete(request, conversation_id, owner)


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


async def add_items(
    request: Request, conversation_id: str, body: CreateItems, owner: str = Depends(authenticate)
) -> dict[str, Any]:
    return await serving.add_items(request, conversation_id, body.items, owner)


async def get_item(
    request: Request, conversation_id: str, item_id: str, owner: str = Depends(authenticate)
) -> dict[str, Any]:
    return await serving.get_item(request, conversation_id, item_id, owner)


ROUTES: tuple[tuple[str, str, Callable[..., Any], Any], ...] = (
    ("POST", "/conversations", create_conversation, None),
    ("GET", "/conversations/{conversation_id}", get_conversation, None),
    ("POST", "/conversations/{conversation_id}", update_conversation, None),
    ("DELETE", "/conversations/{conversation_id}", delete_conversation, None),
    ("GET", "/conversations/{conversation_id}/items", list_items, None),
    ("POST", "/conversations/{conversation_id}/items", add_items, None),
    ("GET", "/conversations/{conversation_id}/items/{item_id}", get_item, None),
)
