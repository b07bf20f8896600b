"""The Response object: built once per request from the chat reply it was translated to.

Its ids are fixed before anything is generated (the response's, its message item's, its
function-call items'), so the streamed events, the stored object and the one a client gets
back name the same items. `ResponseBuilder.finish` builds the final object once and returns
that same object to every later caller: the session's commit stores it, the stream's
`response.completed` sends it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from launcher.proxy.replies import Reply
from launcher.proxy.responses.items import output_text
from launcher.proxy.responses.models import CreateResponse

INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


@dataclass(frozen=True)
class ResponseHead:
    """What a response says before anything is generated."""

    id: str
    created_at: int
    model: str
    request: CreateResponse

    @property
    def suffix(self) -> str:
        return self.id.rsplit("_", 1)[-1]


def usage_of(reply: Reply) -> dict[str, Any] | None:
    """Chat's usage as the Responses API counts it (cached tokens: the KV cache reused)."""
    usage = reply.get("usage")
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + completion,
    }


class ResponseBuilder:
    def __init__(self, head: ResponseHead) -> None:
        self.head = head
        self._final: dict[str, Any] | None = None

    @property
    def message_id(self) -> str:
        return f"msg_{self.head.suffix}"

    def call_item_id(self, index: int) -> str:
        return f"fc_{self.head.suffix}{index:02d}"

    def base(self, status: str) -> dict[str, Any]:
        request = self.head.request
        text_format = request.text.format if request.text and request.text.format else None
        conversation = request.conversation_id()
        return {
            "id": self.head.id,
            "object": "response",
            "created_at": self.head.created_at,
            "status": status,
            "completed_at": None,
            "error": None,
            "incomplete_details": None,
            "instructions": request.instructions,
            "max_output_tokens": request.max_output_tokens,
            "model": self.head.model,
            "output": [],
            "parallel_tool_calls": request.parallel_tool_calls is not False,
            "previous_response_id": request.previous_response_id,
            "conversation": {"id": conversation} if conversation else None,
            "reasoning": {"effort": None, "summary": None},
            "store": request.store,
            "temperature": 1.0 if request.temperature is None else request.temperature,
            "top_p": 1.0 if request.top_p is None else request.top_p,
            "text": {"format": _dump(text_format) if text_format else {"type": "text"}},
            "tool_choice": _dump(request.tool_choice or "auto"),
            "tools": [_tool(t) for t in request.tools or []],
            "truncation": request.truncation or "disabled",
            "metadata": request.metadata or {},
            "background": False,
        } | ({"user": request.user} if request.user else {})

    def finish(self, reply: Reply) -> dict[str, Any]:
        """The completed (or incomplete) response for a chat reply, built once."""
        if self._final is None:
            choice = (reply.get("choices") or [{}])[0]
            reason = INCOMPLETE.get(choice.get("finish_reason") or "")
            final = self.base("incomplete" if reason else "completed")
            final["output"] = self.output(choice.get("message") or {}, reason is None)
            usage = usage_of(reply)
            if usage is not None:  # OpenAI's schema: an object when present, never null
                final["usage"] = usage
            if reason:
                final["incomplete_details"] = {"reason": reason}
            else:
                final["completed_at"] = int(time.time())
            self._final = final
        return self._final

    def output(self, message: dict[str, Any], complete: bool) -> list[dict[str, Any]]:
        status = "completed" if complete else "incomplete"
        text, calls = message.get("content") or "", message.get("tool_calls") or []
        items: list[dict[str, Any]] = []
        if text or not calls:
            items.append(self.message_item(text, status))
        for index, call in enumerate(calls):
            function = call.get("function") or {}
            items.append(self.call_item(index, call.get("id") or "", function.get("name", ""),
                                        function.get("arguments", ""), status))  # fmt: skip
        return items

    def message_item(self, text: str | None, status: str) -> dict[str, Any]:
        content = [] if text is None else [output_text(text)]
        return {"id": self.message_id, "type": "message", "status": status,
                "role": "assistant", "content": content}  # fmt: skip

    def call_item(
        self, index: int, call_id: str, name: str, arguments: str, status: str
    ) -> dict[str, Any]:
        return {"id": self.call_item_id(index), "type": "function_call", "status": status,
                "call_id": call_id, "name": name, "arguments": arguments}  # fmt: skip

    def failed(self, message: str, code: str = "server_error") -> dict[str, Any]:
        failed = self.base("failed")
        failed["error"] = {"code": code, "message": message}
        return failed


def _dump(value: Any) -> Any:
    if isinstance(value, str):
        return value
    return value.model_dump(mode="json", exclude_none=True, by_alias=True)


def _tool(tool: Any) -> dict[str, Any]:
    """A function tool as the Response object lists it (every field OpenAI's schema
    requires: `parameters` and `strict` may be null)."""
    return {
        "type": "function",
        "name": tool.name,
        "description": tool.description,
        "parameters": tool.parameters,
        "strict": tool.strict,
    }
