"""The Responses API's stream, made from the chat stream the request was translated to.

OpenAI's order: `response.created`, `response.in_progress`; per output item
`response.output_item.added`, for a message `response.content_part.added` and
`response.output_text.delta`s, for a function call `response.function_call_arguments.delta`s;
then each item's `...done` events (`response.output_text.done`,
`response.content_part.done`, `response.function_call_arguments.done`,
`response.output_item.done`) and `response.completed` with the whole response and its
usage; a reply cut by `max_output_tokens` is a completed event whose response has status
`incomplete` (OpenAI sends `response.incomplete` then, which the openai SDK's stream helper
does not take as the end of a stream). Every event has its `sequence_number` and an SSE
`event:` line naming its type. A chat stream that ends in an error event (the backend failed, the
session could not be stored) ends this one with `error` and `response.failed`; the session
then holds nothing of the turn.
"""

from __future__ import annotations

from typing import Any

from launcher.proxy.replies import named_sse
from launcher.proxy.responses.items import output_text
from launcher.proxy.responses.objects import ResponseBuilder
from launcher.proxy.translated import TranslatedStream

Event = dict[str, Any]


class ResponseStream(TranslatedStream):
    """One response's events; iterate `events(chat_stream)`."""

    def __init__(self, builder: ResponseBuilder) -> None:
        super().__init__()
        self.builder = builder
        self.start = builder.base("in_progress")  # built before the stream: a bug is a 500
        self.sequence = 0
        self.open: dict[str, int] = {}  # item id -> output index, while it streams
        self.order: list[str] = []  # item ids in the order they were added

    def make(self, kind: str, **fields: Any) -> bytes:
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return named_sse(event)

    def opening(self) -> list[bytes]:
        return [self.make("response.created", response=self.start),
                self.make("response.in_progress", response=self.start)]  # fmt: skip

    def _add(self, item: dict[str, Any]) -> bytes:
        self.open[item["id"]] = len(self.order)
        self.order.append(item["id"])
        return self.make("response.output_item.added", output_index=len(self.order) - 1,
                         item=item)  # fmt: skip

    def _open_message(self) -> list[bytes]:
        item_id = self.builder.message_id
        if item_id in self.open:
            return []
        added = self._add(self.builder.message_item(None, "in_progress"))
        part = self.make("response.content_part.added", item_id=item_id,
                         output_index=self.open[item_id], content_index=0,
                         part=output_text(""))  # fmt: skip
        return [added, part]

    def text(self, delta: str) -> list[bytes]:
        out = self._open_message()
        item_id = self.builder.message_id
        out.append(self.make("response.output_text.delta", item_id=item_id,
                             output_index=self.open[item_id], content_index=0, delta=delta,
                             logprobs=[]))  # fmt: skip
        return out

    def call(self, delta: dict[str, Any]) -> list[bytes]:
        index = int(delta.get("index", 0))
        item_id = self.builder.call_item_id(index)
        out: list[bytes] = []
        function = delta.get("function") or {}
        if item_id not in self.open:
            item = self.builder.call_item(index, delta.get("id") or "", function.get("name") or "",
                                          "", "in_progress")  # fmt: skip
            out.append(self._add(item))
        if function.get("arguments"):
            out.append(self.make("response.function_call_arguments.delta", item_id=item_id,
                                 output_index=self.open[item_id],
                                 delta=function["arguments"]))  # fmt: skip
        return out

    def finish(self) -> list[bytes]:
        final = self.builder.finish(self.result.reply())
        out = [] if self.order else self._open_message()
        items = {item["id"]: item for item in final["output"]}
        for item_id in self.order:
            item = items.get(item_id)
            if item is not None:
                out += self._done(item, self.order.index(item_id))
        out.append(self.make("response.completed", response=final))
        return out

    def _done(self, item: dict[str, Any], index: int) -> list[bytes]:
        out: list[bytes] = []
        if item["type"] == "message":
            part = item["content"][0] if item["content"] else output_text("")
            where = {"item_id": item["id"], "output_index": index, "content_index": 0}
            out.append(self.make("response.output_text.done", **where, text=part["text"],
                                 logprobs=[]))  # fmt: skip
            out.append(self.make("response.content_part.done", **where, part=part))
        else:
            out.append(self.make("response.function_call_arguments.done", item_id=item["id"],
                                 output_index=index, name=item["name"],
                                 arguments=item["arguments"]))  # fmt: skip
        out.append(self.make("response.output_item.done", output_index=index, item=item))
        return out

    def fail(self, error: dict[str, Any]) -> list[bytes]:
        message = str(error.get("message") or "the response failed")
        code = error.get("code")
        failed = self.builder.failed(message)
        return [
            self.make("error", code=code, message=message, param=error.get("param")),
            self.make("response.failed", response=failed),
        ]
