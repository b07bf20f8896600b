"""The Messages API's stream, made from the chat stream the request was translated to.

Anthropic's order: `message_start`, `ping`, then per content block `content_block_start`,
its `content_block_delta`s (`text_delta` for text, `input_json_delta` for a tool call's
input) and `content_block_stop`, then `message_delta` (the stop reason and the whole usage)
and `message_stop`. A block is closed when the next one starts. A chat stream that ends in an
error event ends this one with Anthropic's `error` event; the session then holds nothing.
"""

from __future__ import annotations

from typing import Any

from launcher.proxy.messages.convert import stop_fields, usage
from launcher.proxy.messages.errors import anthropic_error
from launcher.proxy.replies import named_sse
from launcher.proxy.translated import TranslatedStream


class MessageStream(TranslatedStream):
    """One message's events; iterate `events(chat_stream)`."""

    def __init__(self, message_id: str, model: str) -> None:
        super().__init__()
        self.message_id, self.model = message_id, model
        self.index = -1  # the open block's index
        self.block: tuple[str, int] | None = None  # ("text", 0) or ("tool", call index)

    def opening(self) -> list[bytes]:
        message = {"id": self.message_id, "type": "message", "role": "assistant",
                   "model": self.model, "content": [], "stop_reason": None,
                   "stop_sequence": None, "usage": usage(None)}  # fmt: skip
        return [named_sse({"type": "message_start", "message": message}),
                named_sse({"type": "ping"})]  # fmt: skip

    def text(self, delta: str) -> list[bytes]:
        out = self._start(("text", 0), {"type": "text", "text": ""})
        return [*out, self._delta({"type": "text_delta", "text": delta})]

    def fail(self, error: dict[str, Any]) -> list[bytes]:
        text = str(error.get("message") or "the reply failed")
        return [named_sse(anthropic_error(500, text))]

    def call(self, call: dict[str, Any]) -> list[bytes]:
        function = call.get("function") or {}
        block = {"type": "tool_use", "id": call.get("id") or "",
                 "name": function.get("name") or "", "input": {}}  # fmt: skip
        out = self._start(("tool", int(call.get("index", 0))), block)
        if function.get("arguments"):
            out.append(self._delta({"type": "input_json_delta",
                                    "partial_json": function["arguments"]}))  # fmt: skip
        return out

    def _start(self, block: tuple[str, int], content: dict[str, Any]) -> list[bytes]:
        if self.block == block:
            return []
        out = self._stop()
        self.index += 1
        self.block = block
        out.append(named_sse({"type": "content_block_start", "index": self.index,
                              "content_block": content}))  # fmt: skip
        return out

    def _delta(self, delta: dict[str, Any]) -> bytes:
        return named_sse({"type": "content_block_delta", "index": self.index, "delta": delta})

    def _stop(self) -> list[bytes]:
        if self.block is None:
            return []
        self.block = None
        return [named_sse({"type": "content_block_stop", "index": self.index})]

    def finish(self) -> list[bytes]:
        out = [] if self.index >= 0 else self._start(("text", 0), {"type": "text", "text": ""})
        out += self._stop()
        delta = stop_fields(self.result.finish_reason, self.result.stop_string)
        out.append(named_sse({"type": "message_delta", "delta": delta,
                              "usage": usage(self.result.usage)}))  # fmt: skip
        out.append(named_sse({"type": "message_stop"}))
        return out
