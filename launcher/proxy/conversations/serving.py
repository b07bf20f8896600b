"""The Conversations API's work, on the session store."""

from __future__ import annotations

import time
from functools import partial
from typing import Any

import anyio
from fastapi import Request

from launcher.errors import BadRequestError, NotFoundError
from launcher.proxy import worker_slots
from launcher.proxy.context import Conversation, TurnPlan
from launcher.proxy.conversations.models import CreateConversation, UpdateConversation
from launcher.proxy.replica import routed_id
from launcher.proxy.responses.items import items_of, messages_of, page
from launcher.proxy.responses.serving import no_conversation
from launcher.proxy.state import ProxyState, proxy_state
from launcher.proxy.store import ConversationRecord, Message, NewTurn
from launcher.proxy.turns import check_turn_limits


def resource(record: ConversationRecord) -> dict[str, Any]:
    return {"id": record.id, "object": "conversation", "created_at": int(record.created),
            "metadata": record.metadata}  # fmt: skip


def system_of(texts: list[str]) -> Message | None:
    text = "\n\n".join(t for t in texts if t)
    return {"role": "system", "content": text} if text else None


async def _record(st: ProxyState, owner: str, conversation_id: str) -> ConversationRecord:
    found = await anyio.to_thread.run_sync(st.sessions.conversation, owner, conversation_id)
    if found is None:
        raise no_conversation(conversation_id)
    return found


async def create(request: Request, body: CreateConversation, owner: str) -> dict[str, Any]:
    st = proxy_state(request)
    texts, messages = messages_of(body.items or [])
    record = ConversationRecord(routed_id("conv", st.proxy.replica_name), time.time(),
                                body.metadata or {})  # fmt: skip
    plan = TurnPlan(system_of(texts), messages, keep=0)
    await check_turn_limits(st, owner, Conversation(), plan)
    await anyio.to_thread.run_sync(st.sessions.check_space)
    make = partial(st.sessions.create_conversation, owner, record, messages,
                   system=system_of(texts))  # fmt: skip
    await anyio.to_thread.run_sync(make)
    return resource(record)


async def retrieve(request: Request, conversation_id: str, owner: str) -> dict[str, Any]:
    return resource(await _record(proxy_state(request), owner, conversation_id))


async def update(
    request: Request, conversation_id: str, body: UpdateConversation, owner: str
) -> dict[str, Any]:
    st = proxy_state(request)
    change = partial(st.sessions.update_conversation, owner, conversation_id, body.metadata)
    found = await anyio.to_thread.run_sync(change)
    if found is None:
        raise no_conversation(conversation_id)
    return resource(found)


async def delete(request: Request, conversation_id: str, owner: str) -> dict[str, Any]:
    """Delete the conversation: its session, its responses and its KV on the worker."""
    st = proxy_state(request)
    await _record(st, owner, conversation_id)
    async with st.session_lock(owner, conversation_id):
        await anyio.to_thread.run_sync(st.sessions.delete, owner, conversation_id)
    await worker_slots.forget_session(st, owner, conversation_id)
    return {"id": conversation_id, "object": "conversation.deleted", "deleted": True}


async def list_items(
    request: Request, conversation_id: str, owner: str, *, limit: int, order: str,
    after: str | None,
) -> dict[str, Any]:  # fmt: skip
    st = proxy_state(request)
    await _record(st, owner, conversation_id)
    history = await anyio.to_thread.run_sync(st.sessions.load, owner, conversation_id)
    return page(items_of(conversation_id, history.body()), limit=limit, order=order, after=after)


async def get_item(
    request: Request, conversation_id: str, item_id: str, owner: str
) -> dict[str, Any]:
    st = proxy_state(request)
    await _record(st, owner, conversation_id)
    history = await anyio.to_thread.run_sync(st.sessions.load, owner, conversation_id)
    for item in items_of(conversation_id, history.body()):
        if item["id"] == item_id:
            return item
    raise NotFoundError(
        f"no item `{item_id}` in conversation `{conversation_id}`", param="item_id",
        code="item_not_found",
    )  # fmt: skip


async def add_items(
    request: Request, conversation_id: str, items: list[Any], owner: str
) -> dict[str, Any]:
    """Append items (a turn without a reply, under the session's lock); the items added."""
    st = proxy_state(request)
    texts, messages = messages_of(items)
    if not messages:
        raise BadRequestError("`items` holds no message or function call", param="items")
    await _record(st, owner, conversation_id)
    async with st.session_lock(owner, conversation_id):
        history = await anyio.to_thread.run_sync(st.sessions.load, owner, conversation_id)
        plan = TurnPlan(system_of(texts), messages, keep=len(history.turns))
        await check_turn_limits(st, owner, history, plan)
        await anyio.to_thread.run_sync(st.sessions.check_space)
        turn = NewTurn(history, len(history.turns), messages, system=system_of(texts))
        if not await anyio.to_thread.run_sync(st.sessions.commit, owner, conversation_id, turn):
            raise no_conversation(conversation_id)
    before = len(items_of(conversation_id, history.body()))
    added = items_of(conversation_id, history.body() + messages)[before:]
    return page(added, limit=len(added), order="asc", after=None)
