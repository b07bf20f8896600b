"""Choices in OpenAI's shapes: chat messages and deltas with tool calls (or the legacy
`function_call`), finish reasons, and log probabilities for chat and text completions.

A choice that called tools and then ended on its own finishes with `tool_calls`
(`function_call` for the functions API); one cut at `max_tokens` stays `length`. A chat
message with calls has no content (null) unless the model wrote text before them. Streamed,
a call's first delta is `{index, id, type: "function", function: {name, arguments: ""}}` and
the next ones `{index, function: {arguments}}`, as OpenAI streams them. `ChatChunks` and
`CompletionChunks` shape one stream's chunks for the workers' one streamer (`api._chunks`).
"""

from __future__ import annotations

from typing import Any, Protocol

from pydantic import BaseModel

from launcher.protocol import (
    ChatCompletionChunk,
    ChatCompletionMessage,
    Choice,
    ChoiceDelta,
    ChunkChoice,
    CompletionChoice,
    CompletionChunk,
    new_id,
    now,
)
from launcher.workers.choices import ChoiceOutput, Delta
from launcher.workers.generation import TokenLogprob
from launcher.workers.tool_parser import CallDelta


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


def chat_choices(outputs: list[ChoiceOutput], *, legacy: bool, logprobs: bool) -> list[Choice]:
    """A whole chat reply's choices."""
    return [
        Choice(
            index=o.index,
            message=chat_message(o, legacy=legacy),
            finish_reason=finish_reason(o, legacy=legacy),
            logprobs=chat_logprobs(o.logprobs) if logprobs else None,
            stop_reason=o.stop_string,
        )
        for o in outputs
    ]


def completion_choices(
    outputs: list[ChoiceOutput], *, echo: str, offset: int, logprobs: bool
) -> list[CompletionChoice]:
    """A whole text completion's choices (the prompt before each when `echo`)."""
    return [
        CompletionChoice(
            index=o.index,
            text=echo + o.content,
            finish_reason=o.finish_reason or "stop",
            logprobs=completion_logprobs(o.logprobs, offset) if logprobs else None,
            stop_reason=o.stop_string,
        )
        for o in outputs
    ]


class ChunkFactory(Protocol):
    """How one endpoint's stream chunks look; the workers' one streamer streams either."""

    def opening(self, outputs: list[ChoiceOutput]) -> list[BaseModel]: ...

    def delta_chunk(self, output: ChoiceOutput, delta: Delta) -> BaseModel: ...

    def finish_chunk(self, output: ChoiceOutput) -> BaseModel: ...

    def usage_chunk(self, usage: Any) -> BaseModel: ...


class ChatChunks:
    """A streamed chat completion: a first chunk naming the assistant per choice, then
    deltas (text, calls' pieces, log probabilities), each choice's finish reason."""

    def __init__(self, model: str, *, legacy: bool, logprobs: bool) -> None:
        self.model, self.id, self.created = model, new_id("chatcmpl"), now()
        self.legacy, self.logprobs = legacy, logprobs

    def _chunk(
        self, index: int, delta: ChoiceDelta, finish: str | None = None, **extra: Any
    ) -> ChatCompletionChunk:
        choice = ChunkChoice(index=index, delta=delta, finish_reason=finish, **extra)
        return ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=[choice]
        )

    def opening(self, outputs: list[ChoiceOutput]) -> list[ChatCompletionChunk]:
        return [self._chunk(o.index, ChoiceDelta(role="assistant", content="")) for o in outputs]

    def delta_chunk(self, output: ChoiceOutput, delta: Delta) -> ChatCompletionChunk:
        logprobs = chat_logprobs(delta.logprobs) if self.logprobs else None
        return self._chunk(output.index, chat_delta(delta, legacy=self.legacy), logprobs=logprobs)

    def finish_chunk(self, output: ChoiceOutput) -> ChatCompletionChunk:
        finish = finish_reason(output, legacy=self.legacy)
        return self._chunk(output.index, ChoiceDelta(), finish, stop_reason=output.stop_string)

    def usage_chunk(self, usage: Any) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=[], usage=usage
        )


class CompletionChunks:
    """A streamed text completion: the prompt first per choice when `echo`, then text
    pieces (with their log probabilities), each choice's finish reason."""

    def __init__(self, model: str, *, echo: str, offset: int, logprobs: bool) -> None:
        self.model, self.id, self.created = model, new_id("cmpl"), now()
        self.echo, self.offset, self.logprobs = echo, offset, logprobs

    def _chunk(
        self, index: int, text: str, finish: str | None = None, **extra: Any
    ) -> CompletionChunk:
        choice = CompletionChoice(index=index, text=text, finish_reason=finish, **extra)
        return CompletionChunk(id=self.id, created=self.created, model=self.model, choices=[choice])

    def opening(self, outputs: list[ChoiceOutput]) -> list[CompletionChunk]:
        return [self._chunk(o.index, self.echo) for o in outputs] if self.echo else []

    def delta_chunk(self, output: ChoiceOutput, delta: Delta) -> CompletionChunk:
        # where the delta's text begins: the prompt (when echoed) and the choice's text before it
        offset = self.offset + len(output.content) - len(delta.content)
        logprobs = completion_logprobs(delta.logprobs, offset) if self.logprobs else None
        return self._chunk(output.index, delta.content, logprobs=logprobs)

    def finish_chunk(self, output: ChoiceOutput) -> CompletionChunk:
        finish = output.finish_reason or "stop"
        return self._chunk(output.index, "", finish, stop_reason=output.stop_string)

    def usage_chunk(self, usage: Any) -> CompletionChunk:
        return CompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=[], usage=usage
        )
