"""Replies as OpenAI's schemas have them, and the reply a session keeps of a turn.

A backend's reply or stream chunk is passed on with what OpenAI's response schemas require
and the backend left out: a chat message's `refusal` (required, nullable), each choice's
`logprobs`, and, in a stream whose client asked for usage, `"usage": null` on every chunk
but the last. Every object and chunk carries the served build's `system_fingerprint` (a
string, as OpenAI's schema types it; never null). A session stores the reply as it was sent,
so a retry of the same request gets exactly that reply again (`replay_events` re-streams it,
with the fingerprint of the build that generated it).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import orjson
from starlette.responses import JSONResponse

Reply = dict[str, Any]


class ReplyResponse(JSONResponse):
    """A JSON reply written by orjson (the same compact UTF-8 JSON as Starlette's, in a
    fraction of the time; Python's json for an integer past 64 bits)."""

    def render(self, content: Any) -> bytes:
        try:
            return orjson.dumps(content)
        except TypeError:
            return super().render(content)


def with_fingerprint(value: Reply, fingerprint: str | None) -> Reply:
    """`value` with `fingerprint` as its `system_fingerprint`; without one, a non-string
    value (a null from an older store) is left out rather than sent."""
    if fingerprint:
        value["system_fingerprint"] = fingerprint
    elif not isinstance(value.get("system_fingerprint"), str):
        value.pop("system_fingerprint", None)
    return value


def conform_reply(reply: Reply, kind: str, fingerprint: str | None = None) -> Reply:
    """A non-streamed reply with every field OpenAI's schema requires."""
    with_fingerprint(reply, fingerprint)
    for choice in reply.get("choices") or []:
        if not isinstance(choice, dict):
            continue
        choice.setdefault("logprobs", None)
        message = choice.get("message")
        if kind == "chat" and isinstance(message, dict):
            message.setdefault("refusal", None)
            message.setdefault("content", None)
    return reply


def conform_chunk(chunk: Reply, wants_usage: bool, fingerprint: str | None = None) -> Reply:
    """A stream chunk as OpenAI sends it; `usage` is null until the last chunk."""
    with_fingerprint(chunk, fingerprint)
    for choice in chunk.get("choices") or []:
        if isinstance(choice, dict):
            choice.setdefault("logprobs", None)
            choice.setdefault("finish_reason", None)
    if wants_usage:
        chunk.setdefault("usage", None)
    return chunk


def chunk_json(chunk: Reply, raw: bytes, wants_usage: bool, fingerprint: str | None) -> bytes:
    """`conform_chunk(chunk, ...)` as JSON, where `raw` is the backend's JSON of `chunk`.

    llmup's workers send every field OpenAI's chunk requires but the fingerprint, so the
    common chunk is the backend's own bytes with the fingerprint spliced in before the
    closing brace; the relay re-encodes only a chunk that needs more (a stream is a chunk a
    token: re-encoding each was most of the relay's own work)."""
    if chunk and raw.endswith(b"}") and _conformed_but_fingerprint(chunk, wants_usage):
        if not fingerprint:
            return raw
        return b'%s,"system_fingerprint":%s}' % (raw[:-1], orjson.dumps(fingerprint))
    conformed = conform_chunk(chunk, wants_usage, fingerprint)
    try:
        return orjson.dumps(conformed)
    except TypeError:  # an integer past 64 bits: Python's json writes it
        return json.dumps(conformed, ensure_ascii=False).encode()


def _conformed_but_fingerprint(chunk: Reply, wants_usage: bool) -> bool:
    """Whether conform_chunk would change nothing in `chunk` but add its fingerprint."""
    if "system_fingerprint" in chunk or (wants_usage and "usage" not in chunk):
        return False
    choices = chunk.get("choices") or []
    return all(isinstance(c, dict) and "logprobs" in c and "finish_reason" in c for c in choices)


def assistant_message(reply: Reply) -> dict[str, Any]:
    """The assistant message a session stores from a chat reply (tool calls included)."""
    try:
        message = reply["choices"][0]["message"]
    except (KeyError, IndexError, TypeError):
        message = {}
    stored: dict[str, Any] = {"role": "assistant", "content": message.get("content")}
    for name in ("tool_calls", "function_call"):
        if message.get(name):
            stored[name] = message[name]
    if stored["content"] is None and len(stored) == 2:
        stored["content"] = ""
    return stored


def completion_tokens(reply: Reply) -> int | None:
    usage = reply.get("usage")
    value = usage.get("completion_tokens") if isinstance(usage, dict) else None
    return value if isinstance(value, int) else None


def replay_events(reply: Reply, wants_usage: bool) -> Iterator[bytes]:
    """A stored chat reply streamed again: role and content, the finish, usage if asked."""
    choice = reply["choices"][0]
    message = choice["message"]
    delta: dict[str, Any] = {"role": "assistant", "content": message.get("content") or ""}
    if message.get("tool_calls"):
        delta["tool_calls"] = [{"index": i, **c} for i, c in enumerate(message["tool_calls"])]
    head = {key: reply[key] for key in ("id", "created", "model")}
    with_fingerprint(head, reply.get("system_fingerprint"))
    chunks = [
        _chunk(head, delta, None),
        _chunk(head, {}, choice.get("finish_reason") or "stop"),
    ]
    for chunk in chunks:
        yield sse(json.dumps(conform_chunk(chunk, wants_usage)))
    if wants_usage and reply.get("usage"):
        last = {**head, "object": "chat.completion.chunk", "choices": [], "usage": reply["usage"]}
        yield sse(json.dumps(last))
    yield sse("[DONE]")


def _chunk(head: Reply, delta: dict[str, Any], finish: str | None) -> Reply:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return {**head, "object": "chat.completion.chunk", "choices": [choice]}


def sse(data: str) -> bytes:
    return f"data: {data}\n\n".encode()


def named_sse(event: dict[str, Any]) -> bytes:
    """An event with an `event:` line naming its `type` (the Responses and Messages APIs'
    streams), then its JSON."""
    return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n".encode()


def sse_data(raw: bytes) -> list[Any]:
    """The data of each event in a block of a chat stream as the relay sends it, `[DONE]`
    as the string: what the other APIs' streams are made from."""
    found = []
    for line in raw.decode("utf-8").splitlines():
        if line.startswith("data:"):
            data = line[5:].strip()
            found.append(data if data == "[DONE]" else json.loads(data))
    return found
