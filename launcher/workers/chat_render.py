"""A chat request as the turns a chat template (or Meta's Llama-2 format) renders: tools,
tool calls and results in the history, and a last assistant message to continue.

- **Tools a template knows.** A GGUF whose template calls tools in `<tool_call>` tags (Qwen
  2.5 and 3, Hermes 2 and 3, and others that share the format) gets the tools, the calls
  and the `tool` messages as the template expects them (`native`).
- **Every other template, and Llama-2** (no tool format of its own) get llama.cpp's
  generic treatment: the tools and the call format described in the system message, each
  call of an assistant message written back into its text exactly as the model wrote it
  (`reply_format.format_call`), and each run of tool results as one user message of
  `<tool_response>` blocks (Llama-2 needs user and assistant to alternate). The tools'
  text depends only on the tools, so a conversation that sends the same tools every turn
  renders the same prefix every turn and a session keeps its KV cache.
- **Prefill.** An assistant message last is a reply begun by the client (OpenAI accepts it;
  Anthropic calls it prefill): the prompt ends with that text instead of the end of its
  turn, and the model continues it.

Nothing here tokenizes; `ChatTurns` goes to the worker's renderer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from launcher.protocol import ChatMessage
from launcher.reply_format import CALL_SEPARATOR, TOOL_CLOSE, TOOL_OPEN, ToolUse, format_call

TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE = "<tool_response>", "</tool_response>"
TOOLS_INTRO = "You can call these tools (with the JSON Schema of each one's arguments):"
CALL_HOWTO = (
    f"To call a tool, reply with only this, once per call:\n{TOOL_OPEN}\n"
    '{"name": "<tool name>", "arguments": <the arguments as a JSON object>}\n'
    f"{TOOL_CLOSE}\nTool results come back inside {TOOL_RESPONSE_OPEN}{TOOL_RESPONSE_CLOSE}. "
    "Otherwise, reply in plain text."
)


@dataclass(frozen=True)
class ChatTurns:
    """What a renderer needs: the messages (plain dicts), the tools for a template that
    knows them, and the text of an assistant reply to continue."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    prefill: str | None = None


def knows_tool_calls(template: str | None) -> bool:
    """Whether a chat template renders tools and `<tool_call>` calls itself."""
    return bool(template) and TOOL_OPEN in template and "tools" in template


def chat_turns(messages: list[ChatMessage], use: ToolUse | None, *, native: bool) -> ChatTurns:
    """The request's messages as a template takes them (see the module docstring); a
    ValueError says what is wrong with them."""
    history, prefill = _split_prefill(messages)
    tools = [t.as_tool() for t in use.tools] if use and use.tools else None
    if native:
        return ChatTurns([_native(m) for m in history], tools, prefill)
    return ChatTurns(_generic(history, tools), None, prefill)


def _split_prefill(messages: list[ChatMessage]) -> tuple[list[ChatMessage], str | None]:
    last = messages[-1] if messages else None
    if last is None or last.role != "assistant":
        return list(messages), None
    if last.tool_calls or last.function_call:
        raise ValueError(
            "the last message is an assistant's tool call: send the tool results (role "
            "`tool`) after it"
        )
    if len(messages) < 2:
        raise ValueError("an assistant message to continue needs a user message before it")
    return list(messages[:-1]), last.text()


def _role(message: ChatMessage) -> str:
    return "system" if message.role == "developer" else message.role


def _calls(message: ChatMessage) -> list[tuple[str, str, str]]:
    """(id, name, arguments) of an assistant message's calls, the legacy one included."""
    calls = [(c.id, c.function.name, c.function.arguments) for c in message.tool_calls or []]
    if message.function_call is not None:
        calls.append(("", message.function_call.name, message.function_call.arguments))
    return calls


def _generic(history: list[ChatMessage], tools: list[dict[str, Any]] | None) -> list[dict]:
    turns: list[dict[str, Any]] = []
    for message in history:
        role = _role(message)
        if role in ("tool", "function"):
            block = f"{TOOL_RESPONSE_OPEN}\n{message.text()}\n{TOOL_RESPONSE_CLOSE}"
            if turns and turns[-1].get("tool_results"):
                turns[-1]["content"] += "\n" + block
            else:
                turns.append({"role": "user", "content": block, "tool_results": True})
            continue
        text = message.text()
        if role == "assistant" and (calls := _calls(message)):
            text += CALL_SEPARATOR.join(format_call(name, args) for _, name, args in calls)
        turns.append({"role": role, "content": text})
    for turn in turns:
        turn.pop("tool_results", None)
    if tools:
        _add_tools(turns, tools)
    return turns


def _add_tools(turns: list[dict[str, Any]], tools: list[dict[str, Any]]) -> None:
    """The tools and the call format at the end of the system message (made when absent)."""
    listed = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
    text = f"{TOOLS_INTRO}\n{listed}\n\n{CALL_HOWTO}"
    if turns and turns[0]["role"] == "system":
        turns[0]["content"] = f"{turns[0]['content']}\n\n{text}"
    else:
        turns.insert(0, {"role": "system", "content": text})


def _native(message: ChatMessage) -> dict[str, Any]:
    role = _role(message)
    if role == "function":
        role = "tool"
    turn: dict[str, Any] = {"role": role, "content": message.text()}
    calls = _calls(message) if role == "assistant" else []
    if calls:
        turn["tool_calls"] = [
            {"id": id_, "type": "function", "function": {"name": name, "arguments": _args(args)}}
            for id_, name, args in calls
        ]
    for name in ("name", "tool_call_id"):
        if getattr(message, name, None):
            turn[name] = getattr(message, name)
    return turn


def _args(arguments: str) -> Any:
    """Templates of this family write `arguments | tojson`: an object, when it parses."""
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments
