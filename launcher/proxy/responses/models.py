"""The Responses API's request models: what llmup accepts of OpenAI's `CreateResponse`.

Text in, text (and function calls) out: content parts are text (`input_text`,
`output_text`, `text`); images, files and audio are refused, and so is background mode.
Only function tools are served: hosted tools (web search, file search, ...) and tool
namespaces are left out of the prompt (see `function_tools`). Fields OpenAI defines that
change nothing here (`reasoning`, `include`, `user`, `prompt_cache_key`, ...) are accepted
and ignored, like unknown fields.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from launcher.protocol import MAX_TOOLS, FunctionName, check_plain_json

log = logging.getLogger(__name__)


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class TextContent(_Open):
    """A text part: `input_text` from the user, `output_text` from the model."""

    type: Literal["input_text", "output_text", "text", "refusal"]
    text: str = ""
    refusal: str | None = None

    def plain(self) -> str:
        return self.refusal if self.type == "refusal" and self.refusal else self.text


class MessageItem(_Open):
    """A message: the easy form (`{"role", "content"}`) or the item form."""

    type: Literal["message"] = "message"
    id: str | None = None
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[TextContent]
    status: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.plain() for part in self.content)


class FunctionCallItem(_Open):
    type: Literal["function_call"]
    id: str | None = None
    call_id: str = Field(min_length=1)
    name: FunctionName
    arguments: str
    status: str | None = None


class FunctionCallOutputItem(_Open):
    type: Literal["function_call_output"]
    id: str | None = None
    call_id: str = Field(min_length=1)
    output: str | list[TextContent]
    status: str | None = None

    def text(self) -> str:
        if isinstance(self.output, str):
            return self.output
        return "".join(part.plain() for part in self.output)


class ReasoningItem(_Open):
    """A reasoning item a client sends back: this server makes none, so it is dropped."""

    type: Literal["reasoning"]


InputItem = Annotated[
    MessageItem | FunctionCallItem | FunctionCallOutputItem | ReasoningItem,
    Field(discriminator="type"),
]


class FunctionTool(_Open):
    type: Literal["function"]
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunction(_Open):
    type: Literal["function"]
    name: FunctionName


class TextFormat(_Open):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    description: str | None = None
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> TextFormat:
        if self.type == "json_schema" and self.schema_ is None:
            raise ValueError("a `json_schema` format needs its `schema`")
        return self


class TextParam(_Open):
    format: TextFormat | None = None


class ConversationRef(_Open):
    id: str = Field(min_length=1)


def typed_items(value: Any) -> Any:
    """Items without `type` are messages (the easy input form)."""
    if isinstance(value, list):
        return [
            {**item, "type": "message"} if isinstance(item, dict) and "type" not in item else item
            for item in value
        ]
    return value


class ResponseInput(_Open):
    """What the create and count requests share: the input and how it is read."""

    model: str | None = None
    input: str | list[InputItem] | None = None
    instructions: str | None = None
    previous_response_id: str | None = Field(default=None, min_length=1)
    conversation: str | ConversationRef | None = None
    tools: list[FunctionTool] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    text: TextParam | None = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _checked(cls, data: Any) -> Any:
        check_plain_json(data)
        if isinstance(data, dict):
            data = {**data, "input": typed_items(data.get("input"))}
            if "tools" in data:
                data["tools"] = function_tools(data["tools"])
        return data

    @model_validator(mode="after")
    def _one_state(self) -> ResponseInput:
        if self.previous_response_id and self.conversation:
            raise ValueError("`previous_response_id` and `conversation` cannot be used together")
        return self

    def conversation_id(self) -> str | None:
        if isinstance(self.conversation, ConversationRef):
            return self.conversation.id
        return self.conversation

    def items(self) -> list[Any]:
        """The input as items (a string is one user message)."""
        if self.input is None:
            return []
        if isinstance(self.input, str):
            return [MessageItem(role="user", content=self.input)]
        return list(self.input)


def function_tools(tools: Any) -> Any:
    """The function tools of a request; the others are left out. Agent clients send tools
    this server cannot run along with their own: Codex CLI sends `web_search` (a hosted
    tool) and a `namespace` of sub-agent tools with every request, and would get nothing
    done if they were refused; the model is simply not told of them."""
    if not isinstance(tools, list):
        return tools
    kept = [t for t in tools if not isinstance(t, dict) or t.get("type") == "function"]
    if len(kept) < len(tools):
        dropped = sorted({str(t.get("type")) for t in tools if t not in kept})
        log.info("left out tools of types %s (only function tools are served)", dropped)
    return kept


class CreateResponse(ResponseInput):
    """`POST /v1/responses`."""

    model: str
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    store: bool = True
    stream: bool = False
    metadata: dict[str, str] | None = Field(default=None, max_length=16)
    background: bool | None = None
    top_logprobs: int | None = None
    truncation: Literal["auto", "disabled"] | None = None
    user: str | None = None

    @field_validator("background")
    @classmethod
    def _no_background(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("background responses are not available on this server")
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _no_logprobs(cls, value: int | None) -> int | None:
        if value:
            raise ValueError("log probabilities are not available from this server")
        return value
