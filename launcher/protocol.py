"""OpenAI wire models shared by the proxy and the backend workers.

Names follow OpenAI's API reference so a reader can check a field against the spec. Requests
allow unknown fields (``extra="allow"``): the proxy passes them through to a backend that may
understand them, and a backend ignores what it does not. Plain data only: no FastAPI import, so
both the proxy and a worker process can use this module without importing each other.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer

Role = Literal["system", "developer", "user", "assistant", "tool", "function"]
FinishReason = Literal["stop", "length", "content_filter", "tool_calls", "function_call"]


class _Open(BaseModel):
    """Request side: unknown fields are kept so they can be forwarded."""

    model_config = ConfigDict(extra="allow")


class _Wire(BaseModel):
    """Response side: extra fields allowed so a backend's additions survive a round trip."""

    model_config = ConfigDict(extra="allow")


# ---- requests -----------------------------------------------------------------------------


class ChatMessage(_Open):
    role: Role
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self) -> str:
        """The message as plain text; content parts other than text are an error for Llama-2."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        texts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"unsupported content part type {part.get('type')!r}")
            texts.append(part["text"])
        return "".join(texts)


class StreamOptions(_Open):
    include_usage: bool | None = None


class ResponseFormat(_Open):
    type: Literal["text", "json_object", "json_schema"] = "text"


class _SamplingRequest(_Open):
    """Fields chat and legacy completions share."""

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(default=1, ge=1)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    user: str | None = None

    def stop_list(self) -> list[str]:
        """`stop` as a list of non-empty strings (OpenAI accepts a string or a list)."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]

    def wants_usage_chunk(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    response_format: ResponseFormat | None = None

    def requested_max_tokens(self) -> int | None:
        """`max_completion_tokens` replaced `max_tokens` in the spec; either is honoured."""
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = False
    suffix: str | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


class TokenizeInputRequest(_Open):
    """llama_cpp.server's `/extras/tokenize` body, so one proxy route serves both backends."""

    model: str | None = None
    input: str


# ---- responses ----------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


class Usage(_Wire):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class ChatCompletionMessage(_Wire):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class Choice(_Wire):
    index: int = 0
    message: ChatCompletionMessage
    finish_reason: FinishReason | None = None
    logprobs: Any | None = None


class ChatCompletionResponse(_Wire):
    id: str = Field(default_factory=lambda: new_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[Choice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ChoiceDelta(_Wire):
    """A streamed delta carries only the fields that changed, as OpenAI sends it."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _drop_none(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChunkChoice(_Wire):
    index: int = 0
    delta: ChoiceDelta
    finish_reason: FinishReason | None = None
    logprobs: Any | None = None


class ChatCompletionChunk(_Wire):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class CompletionChoice(_Wire):
    index: int = 0
    text: str
    finish_reason: FinishReason | None = None
    logprobs: Any | None = None


class CompletionResponse(_Wire):
    id: str = Field(default_factory=lambda: new_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class CompletionChunk(CompletionResponse):
    """OpenAI streams legacy completions as `text_completion` objects too."""


class ModelCard(_Wire):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "llmup"


class ModelList(_Wire):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeInputResponse(_Wire):
    tokens: list[int]


class TokenizeInputCountResponse(_Wire):
    count: int


# ---- errors -------------------------------------------------------------------------------

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


class ErrorDetail(_Wire):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Wire):
    error: ErrorDetail


def error_type_for_status(status: int) -> str:
    """OpenAI's `error.type` for an HTTP status; any 5xx not listed is a server error."""
    return _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_body(
    message: str,
    *,
    status: int = 400,
    type: str | None = None,
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    """The JSON body of an OpenAI error; the official clients read `error.message` from it."""
    detail = ErrorDetail(
        message=message, type=type or error_type_for_status(status), param=param, code=code
    )
    return ErrorResponse(error=detail).model_dump()
