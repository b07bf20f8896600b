"""Responses items and chat messages, both ways.

A session stores chat messages (what the chat template renders); the Responses and
Conversations APIs speak items. Input items become messages (`messages_of`): a user or
assistant message as it is (one right after another of the same role joins it), system
and developer messages the system message, consecutive `function_call` items one
assistant message with `tool_calls`, a `function_call_output` a
`tool` message, and reasoning items (this server makes none) dropped. Stored messages become
items again (`items_of`) with ids derived from the session and the message's place in it, so
the same message has the same id on every listing.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

from launcher.errors import BadRequestError
from launcher.proxy.responses.models import (
    FunctionCallItem,
    FunctionCallOutputItem,
    MessageItem,
)
from launcher.proxy.store import Message

Item = dict[str, Any]


def new_id(prefix: str) -> str:
    """A fresh item id, OpenAI-style (`msg_` and 48 hex)."""
    return f"{prefix}_{secrets.token_hex(24)}"


def messages_of(items: list[Any]) -> tuple[list[str], list[Message]]:
    """The input items as (system texts, chat messages) in the stored form."""
    system: list[str] = []
    messages: list[Message] = []
    for item in items:
        if isinstance(item, MessageItem) and item.role in ("system", "developer"):
            system.append(item.text())
        elif isinstance(item, MessageItem):
            _add_text(messages, item.role, item.text())
        elif isinstance(item, FunctionCallItem):
            _add_call(messages, item)
        elif isinstance(item, FunctionCallOutputItem):
            messages.append({"role": "tool", "content": item.text(), "tool_call_id": item.call_id})
    return system, messages


def _add_text(messages: list[Message], role: str, text: str) -> None:
    """A message; one right after another of the same role (and no tool calls) joins it:
    items are finer than messages (Codex CLI sends its environment and the user's request
    as two user messages), and chat templates such as Gemma's require the roles to
    alternate."""
    last = messages[-1] if messages else None
    if last is not None and last["role"] == role and not last.get("tool_calls"):
        last["content"] = "\n\n".join(t for t in (last["content"], text) if t)
        return
    messages.append({"role": role, "content": text})


def _add_call(messages: list[Message], item: FunctionCallItem) -> None:
    """A call joins the assistant message just before it, or starts one."""
    call = {
        "id": item.call_id,
        "type": "function",
        "function": {"name": item.name, "arguments": item.arguments},
    }
    last = messages[-1] if messages else None
    if last is not None and last["role"] == "assistant":
        last.setdefault("tool_calls", []).append(call)
        return
    messages.append({"role": "assistant", "content": None, "tool_calls": [call]})


def input_items(items: list[Any]) -> list[Item]:
    """The input as `GET /v1/responses/{id}/input_items` lists it (each with an id)."""
    listed: list[Item] = []
    for item in items:
        if isinstance(item, MessageItem):
            listed.append(_message_item(item.id or new_id("msg"), item.role, item.text()))
        elif isinstance(item, FunctionCallItem):
            listed.append(_call_item(item.id or new_id("fc"), item.call_id, item.name,
                                     item.arguments))  # fmt: skip
        elif isinstance(item, FunctionCallOutputItem):
            listed.append(_output_item(item.id or new_id("fco"), item.call_id, item.text()))
    return listed


def items_of(session_id: str, messages: list[Message]) -> list[Item]:
    """A session's stored messages as conversation items, in order."""
    listed: list[Item] = []
    for index, message in enumerate(messages):
        role = message.get("role")
        if role == "tool":
            item_id = stable_id("fco", session_id, index, 0)
            listed.append(_output_item(item_id, message.get("tool_call_id") or "",
                                       message.get("content") or ""))  # fmt: skip
            continue
        text = message.get("content")
        if text or role != "assistant" or not message.get("tool_calls"):
            item_id = stable_id("msg", session_id, index, 0)
            listed.append(_message_item(item_id, str(role), text or ""))
        for number, call in enumerate(message.get("tool_calls") or [], start=1):
            function = call.get("function") or {}
            item_id = stable_id("fc", session_id, index, number)
            listed.append(_call_item(item_id, call.get("id") or "", function.get("name", ""),
                                     function.get("arguments", "")))  # fmt: skip
    return listed


def stable_id(prefix: str, session_id: str, index: int, part: int) -> str:
    digest = hashlib.sha256(f"{session_id}\0{index}\0{part}".encode()).hexdigest()
    return f"{prefix}_{digest[:48]}"


def _message_item(item_id: str, role: str, text: str) -> Item:
    part = {"type": "input_text", "text": text}
    content = [output_text(text) if role == "assistant" else part]
    return {"id": item_id, "type": "message", "status": "completed", "role": role,
            "content": content}  # fmt: skip


def output_text(text: str) -> Item:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _call_item(item_id: str, call_id: str, name: str, arguments: str) -> Item:
    return {"id": item_id, "type": "function_call", "status": "completed", "call_id": call_id,
            "name": name, "arguments": arguments}  # fmt: skip


def _output_item(item_id: str, call_id: str, output: str) -> Item:
    return {"id": item_id, "type": "function_call_output", "status": "completed",
            "call_id": call_id, "output": output}  # fmt: skip


def page(items: list[dict[str, Any]], *, limit: int, order: str, after: str | None) -> dict:
    """One page of a list, OpenAI's way (`after` an item id, `order` asc or desc)."""
    ordered = list(items) if order == "asc" else list(reversed(items))
    if after is not None:
        ids = [item["id"] for item in ordered]
        if after not in ids:
            raise BadRequestError(f"no item `{after}` in this list", param="after")
        ordered = ordered[ids.index(after) + 1 :]
    data = ordered[:limit]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": len(ordered) > limit,
    }
