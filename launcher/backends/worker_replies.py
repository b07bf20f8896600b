"""Choices in OpenAI's shapes: chat messages and deltas with tool calls (or the legacy
`function_call`), finish reasons, and log probabilities for chat and text completions.

A choice that called tools and then ended on its own finishes with `tool_calls`
(`function_call` for the functions API); one cut at `max_tokens` stays `length`. A chat
message with calls has no content (null) unless the model wrote text before them. Streamed,
a call's first delta is `{index, id, type: "function", function: {name, arguments: ""}}` and
the next ones `{index, function: {arguments}}`, as OpenAI streams them.
"""

from __future__ import annotations

from typing import Any

from launcher.backends.generation import TokenLogprob
from launcher.backends.tool_parser import CallDelta
from launcher.backends.worker_choices import ChoiceOutput, Delta
from launcher.protocol import ChatCompletionMessage, ChoiceDelta


def finish_reason(output: ChoiceOutput, *, legacy: bool) -> str:
    reason = output.finish_reason or "stop"
    if reason == "stop" and output.calls:
        return "function_call" if legacy else "tool_calls"
    return reason


def chat_message(output: ChoiceOutput, *, legacy: bool) -> ChatCompletionMessage:
    calls = [
        {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
        for c in output.calls
    ]
    content: str | None = output.content
    if calls and not content.strip():
        content = None
    if legacy and calls:
        return ChatCompletionMessage(content=content, function_call=calls[0]["function"])
    return ChatCompletionMessage(content=content, tool_calls=calls or None)


def chat_delta(delta: Delta, *, legacy: bool) -> ChoiceDelta:
    """The streamed delta of `delta` (its text, its calls' pieces)."""
    if legacy:
        pieces = [_function_piece(call) for call in delta.calls]
        function = pieces[0] if len(pieces) == 1 else _merged(pieces)
        return ChoiceDelta(content=delta.content or None, function_call=function)
    calls = [_call_piece(call) for call in delta.calls]
    return ChoiceDelta(content=delta.content or None, tool_calls=calls or None)


def _call_piece(call: CallDelta) -> dict[str, Any]:
    if call.id is not None:
        function = {"name": call.name, "arguments": call.arguments}
        return {"index": call.index, "id": call.id, "type": "function", "function": function}
    return {"index": call.index, "function": {"arguments": call.arguments}}


def _function_piece(call: CallDelta) -> dict[str, Any]:
    if call.id is not None:
        return {"name": call.name, "arguments": call.arguments}
    return {"arguments": call.arguments}


def _merged(pieces: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The legacy API has one call: its pieces in one delta ("name" once, arguments joined)."""
    if not pieces:
        return None
    merged: dict[str, Any] = {"arguments": ""}
    for piece in pieces:
        if "name" in piece:
            merged["name"] = piece["name"]
        merged["arguments"] += piece["arguments"]
    return merged


def chat_logprobs(entries: list[TokenLogprob]) -> dict[str, Any]:
    """OpenAI's `choices[].logprobs` of a chat reply."""
    content = [
        {
            "token": e.token,
            "logprob": e.logprob,
            "bytes": list(e.bytes),
            "top_logprobs": [
                {"token": t.token, "logprob": t.logprob, "bytes": list(t.bytes)} for t in e.top
            ],
        }
        for e in entries
    ]
    return {"content": content, "refusal": None}


def completion_logprobs(entries: list[TokenLogprob], offset: int) -> dict[str, Any]:
    """OpenAI's legacy `logprobs` (`tokens`, `token_logprobs`, `top_logprobs`,
    `text_offset`); `offset` is where the first token's text begins in the returned text
    plus the prompt before it, as llama-cpp-python counts it."""
    offsets = []
    for entry in entries:
        offsets.append(offset)
        offset += len(entry.token)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{t.token: t.logprob for t in e.top} for e in entries],
        "text_offset": offsets,
    }
