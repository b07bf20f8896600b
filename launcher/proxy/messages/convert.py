"""Messages requests as chat requests, and chat replies as Messages.

Anthropic's blocks map onto chat's messages one to one: a user message's `tool_result`
blocks become `tool` messages (before its text, as Anthropic orders them), an assistant's
`tool_use` blocks its `tool_calls` (the input as JSON text), `system` the system message;
`tools` and `tool_choice` (`any` is chat's `required`; `disable_parallel_tool_use` chat's
`parallel_tool_calls: false`), `stop_sequences` (chat's `stop`),
`top_k` (llama.cpp's) follow; `system` messages among the messages join the system
message. Back, a reply's text is a `text` block, each tool call a
`tool_use` block, and the finish reason a `stop_reason`. Usage is Anthropic's: the prompt
tokens read from the KV cache are `cache_read_input_tokens`, the rest `input_tokens`.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from launcher.proxy.messages.models import (
    CountTokensParams,
    MessageParam,
    TextBlock,
    ToolResultBlock,
    ToolUseBlock,
)
from launcher.proxy.store import Message

log = logging.getLogger(__name__)

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
                "function_call": "tool_use"}  # fmt: skip


def chat_messages(params: CountTokensParams) -> list[Message]:
    """The request's conversation as chat messages, the system message first: `system`,
    then the text of any `system` message among `messages` (chat templates take one system
    message, at the start)."""
    texts = [params.system_text() or ""]
    out: list[Message] = []
    for message in params.messages:
        if message.role == "system":
            texts.append("".join(b.text for b in message.blocks() if isinstance(b, TextBlock)))
        elif message.role == "user":
            out += _user(message)
        else:
            out.append(_assistant(message))
    system = "\n\n".join(t for t in texts if t)
    return ([{"role": "system", "content": system}] if system else []) + out


def _user(message: MessageParam) -> list[Message]:
    blocks = message.blocks()
    tools = [
        {"role": "tool", "content": b.text(), "tool_call_id": b.tool_use_id}
        for b in blocks
        if isinstance(b, ToolResultBlock)
    ]
    text = "".join(b.text for b in blocks if isinstance(b, TextBlock))
    return tools + ([{"role": "user", "content": text}] if text or not tools else [])


def _assistant(message: MessageParam) -> Message:
    blocks = message.blocks()
    text = "".join(b.text for b in blocks if isinstance(b, TextBlock))
    calls = [
        {"id": b.id, "type": "function",
         "function": {"name": b.name, "arguments": json.dumps(b.input, ensure_ascii=False)}}
        for b in blocks
        if isinstance(b, ToolUseBlock)
    ]  # fmt: skip
    out: Message = {"role": "assistant", "content": text or (None if calls else "")}
    if calls:
        out["tool_calls"] = calls
    return out


def chat_fields(params: CountTokensParams) -> dict[str, Any]:
    """The chat request's tools and tool_choice."""
    fields: dict[str, Any] = {}
    if params.tools:
        fields["tools"] = [
            {"type": "function", "function": {
                "name": t.name, "description": t.description, "parameters": t.input_schema}}
            for t in params.tools
        ]  # fmt: skip
    choice = params.tool_choice
    if choice is not None:
        named = {"type": "function", "function": {"name": choice.name}}
        fields["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}.get(
            choice.type, named
        )
        if choice.disable_parallel_tool_use and params.tools:
            fields["parallel_tool_calls"] = False
    return fields


def usage(chat_usage: Any) -> dict[str, int]:
    """Chat's usage as Anthropic's (the KV cache reused as cache reads)."""
    chat_usage = chat_usage if isinstance(chat_usage, dict) else {}
    prompt = chat_usage.get("prompt_tokens") or 0
    cached = (chat_usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return {
        "input_tokens": prompt - cached,
        "output_tokens": chat_usage.get("completion_tokens") or 0,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
    }


def tool_input(arguments: str) -> dict[str, Any]:
    """A tool call's arguments as the object Anthropic's `input` is ({} when not one)."""
    try:
        value = json.loads(arguments or "{}")
    except ValueError:
        log.warning("a tool call's arguments are not JSON: %.80r", arguments)
        return {}
    return value if isinstance(value, dict) else {}


def content_blocks(message: dict[str, Any]) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    if message.get("content") or not message.get("tool_calls"):
        blocks.append({"type": "text", "text": message.get("content") or ""})
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        blocks.append({"type": "tool_use", "id": call.get("id") or "",
                       "name": function.get("name", ""),
                       "input": tool_input(function.get("arguments", ""))})  # fmt: skip
    return blocks


def message_object(
    message_id: str, model: str, reply: dict[str, Any]
) -> dict[str, Any]:  # fmt: skip
    """A chat reply as Anthropic's Message."""
    choice = (reply.get("choices") or [{}])[0]
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content_blocks(choice.get("message") or {}),
        **stop_fields(choice.get("finish_reason"), choice.get("stop_reason")),
        "usage": usage(reply.get("usage")),
    }


def stop_fields(finish_reason: str | None, stop_string: Any) -> dict[str, Any]:
    """Anthropic's `stop_reason` and `stop_sequence` from a chat choice's end: a stop string
    that ended it (the slot and exllamav2 workers name it) is `stop_sequence`."""
    if finish_reason in (None, "stop") and isinstance(stop_string, str):
        return {"stop_reason": "stop_sequence", "stop_sequence": stop_string}
    reason = STOP_REASONS.get(finish_reason or "stop", "end_turn")
    return {"stop_reason": reason, "stop_sequence": None}
