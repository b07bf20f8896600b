"""Another API's stream made from a chat stream: the part every translation shares.

The Responses and Messages APIs run as chat requests; their streams are the chat relay's
events read back (`replies.sse_data`) and told again in the API's own events. A subclass
says what to send first, for a piece of text, for a tool-call delta, at the end (`[DONE]`:
the session is stored by then) and for the chat stream's error event; `result` gathers the
whole reply as the relay does (`relay.StreamResult`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from typing import Any

from launcher.proxy.relay import StreamResult
from launcher.proxy.replies import sse_data


class TranslatedStream(ABC):
    def __init__(self) -> None:
        self.result = StreamResult(kind="chat")

    @abstractmethod
    def opening(self) -> list[bytes]: ...

    @abstractmethod
    def text(self, delta: str) -> list[bytes]: ...

    @abstractmethod
    def call(self, delta: dict[str, Any]) -> list[bytes]: ...

    @abstractmethod
    def finish(self) -> list[bytes]: ...

    @abstractmethod
    def fail(self, error: dict[str, Any]) -> list[bytes]: ...

    async def events(self, chat: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        for event in self.opening():
            yield event
        async for raw in chat:
            for data in sse_data(raw):
                if data == "[DONE]":
                    ending = self.finish()
                elif "error" in data:
                    ending = self.fail(data["error"])
                else:
                    for event in self.feed(data):
                        yield event
                    continue
                for event in ending:
                    yield event
                return

    def feed(self, chunk: dict[str, Any]) -> list[bytes]:
        self.result.feed(chunk)
        out: list[bytes] = []
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content"):
                out += self.text(delta["content"])
            for call in delta.get("tool_calls") or []:
                out += self.call(call)
        return out
