"""The proxy's request models: protocol.py's, narrowed to what the backends really accept.

protocol.py's ChatMessage takes any role with optional content; a backend handed a `tool`
message without `tool_call_id`, a `user` message without content, or a token-id prompt
answers with a 500. Here each role is its own model (as in OpenAI's spec), so such requests
are a 400 from the proxy and the OpenAPI schema documents exactly what is accepted.

llama.cpp's own sampling fields (`LlamaCppOptions`) are typed with llama_cpp.server's
bounds: they are forwarded, so they are checked here first (`grammar` is then parsed by
`launcher.proxy.grammar`). Unknown fields are accepted and ignored, never forwarded.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from launcher.protocol import (
    MAX_TOOLS,
    ChatCompletionRequest,
    CompletionRequest,
    FunctionDefinition,
    Tool,
    ToolCall,
    check_plain_json,
)
from launcher.protocol import FunctionCall as _FunctionCall
from launcher.protocol import ResponseFormat as _ResponseFormat

SESSION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$")
NonEmpty = Annotated[str, Field(min_length=1)]
MAX_GRAMMAR_CHARS = 100_000


class TextPart(BaseModel):
    """Llama-2 reads text only: a content part is `{"type": "text", "text": ...}`."""

    model_config = ConfigDict(extra="allow")

    type: Literal["text"]
    text: str


Content = str | list[TextPart]


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str | None = None

    def text(self) -> str:
        content = getattr(self, "content", None)
        if content is None or isinstance(content, str):
            return content or ""
        return "".join(part.text for part in content)


class SystemMessage(_Message):
    role: Literal["system", "developer"]
    content: Content


class UserMessage(_Message):
    role: Literal["user"]
    content: Content


class AssistantMessage(_Message):
    role: Literal["assistant"]
    content: Content | None = None
    tool_calls: list[ToolCall] | None = None
    function_call: _FunctionCall | None = None


class ToolMessage(_Message):
    role: Literal["tool"]
    content: Content
    tool_call_id: str


class FunctionMessage(_Message):
    role: Literal["function"]
    content: str | None
    name: str


ChatMessage = Annotated[
    SystemMessage | UserMessage | AssistantMessage | ToolMessage | FunctionMessage,
    Field(discriminator="role"),
]


class ResponseFormat(_ResponseFormat):
    """`text`, `json_object` (llama.cpp constrains the reply to JSON with a grammar, built
    from llama.cpp's `schema` when given) or OpenAI's `json_schema` (the grammar is built
    from `json_schema.schema`); `type` is required on the wire."""

    type: Literal["text", "json_object", "json_schema"]

    @model_validator(mode="after")
    def _json_schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type `json_schema` needs the `json_schema` object (its `schema`)")
        return self


class LlamaFunction(FunctionDefinition):
    """llama_cpp.server types a parameters schema's top-level values as JSON without
    decimal numbers (a 500 otherwise): `{"minimum": 0.5}` must sit inside a property."""

    @field_validator("parameters")
    @classmethod
    def _no_top_level_decimals(cls, parameters: dict | None) -> dict | None:
        for key, value in (parameters or {}).items():
            if isinstance(value, float):
                raise ValueError(
                    f"`{key}` is a decimal number; the backend takes none at the top level of a "
                    "parameters schema (put it inside a property)"
                )
        return parameters


class LlamaTool(Tool):
    function: LlamaFunction


class LlamaCppOptions(BaseModel):
    """llama.cpp's sampling fields beyond OpenAI's, with llama_cpp.server's bounds."""

    grammar: str | None = Field(
        default=None, max_length=MAX_GRAMMAR_CHARS, description="GBNF grammar the reply follows"
    )
    top_k: int | None = Field(default=None, ge=0, le=2**31 - 1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repeat_penalty: float | None = Field(default=None, ge=0, le=100)
    mirostat_mode: int | None = Field(default=None, ge=0, le=2)
    mirostat_tau: float | None = Field(default=None, ge=0, le=10)
    mirostat_eta: float | None = Field(default=None, ge=0.001, le=1)
    min_tokens: int | None = Field(default=None, ge=0, le=2**31 - 1)


class ChatRequest(LlamaCppOptions, ChatCompletionRequest):
    """OpenAI's chat request plus `session_id`, for clients that cannot set headers."""

    messages: list[ChatMessage] = Field(min_length=1)  # type: ignore[assignment]
    response_format: ResponseFormat | None = None
    tools: list[LlamaTool] | None = Field(default=None, max_length=MAX_TOOLS)  # type: ignore[assignment]
    functions: list[LlamaFunction] | None = Field(default=None, max_length=MAX_TOOLS)  # type: ignore[assignment]
    session_id: str | None = Field(
        default=None, pattern=SESSION_ID.pattern, description="X-Session-Id, in the body"
    )


class TextCompletionRequest(LlamaCppOptions, CompletionRequest):
    """One text prompt: llama_cpp.server takes no token-id prompts and no batch of them."""

    prompt: str | list[str] = Field(description="one prompt (a list of at most one)")
    response_format: ResponseFormat | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: str | list[str]) -> str | list[str]:
        if isinstance(prompt, list) and len(prompt) > 1:
            raise ValueError("send one prompt per request")
        return prompt


class EmbeddingRequest(BaseModel):
    """OpenAI's embeddings request (protocol.py has none), text input only: llama.cpp fails
    on empty or token-id input."""

    model_config = ConfigDict(extra="allow")

    model: str
    input: NonEmpty | Annotated[list[NonEmpty], Field(min_length=1, max_length=256)]
    encoding_format: Literal["float", "base64"] | None = None
    user: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _plain_json(cls, data: object) -> object:
        check_plain_json(data)
        return data

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)
