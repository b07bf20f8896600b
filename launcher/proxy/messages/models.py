"""The Messages API's request models: what llmup accepts of Anthropic's `MessageCreateParams`.

Text and tools: content blocks are `text`, `tool_use` and `tool_result` (a `thinking` block
a client sends back is dropped: this server makes none); images and documents are refused,
and so are Anthropic's server tools (web search, code execution, ...). Fields that change
nothing here (`metadata`, `thinking`, `service_tier`, `cache_control` on blocks) are
accepted and ignored, like unknown fields.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from launcher.protocol import MAX_TOOLS, FunctionName, Stop, check_plain_json


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class TextBlock(_Open):
    type: Literal["text"]
    text: str


class ToolUseBlock(_Open):
    type: Literal["tool_use"]
    id: str = Field(min_length=1)
    name: FunctionName
    input: dict[str, Any]


class ToolResultBlock(_Open):
    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1)
    content: str | list[TextBlock] | None = None
    is_error: bool | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            text = self.content or ""
        else:
            text = "".join(block.text for block in self.content)
        return f"Error: {text}" if self.is_error else text


class ThinkingBlock(_Open):
    type: Literal["thinking", "redacted_thinking"]


Block = Annotated[
    TextBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock, Field(discriminator="type")
]


class MessageParam(_Open):
    """A message; `system` ones in the middle of the conversation (Claude Code sends them,
    Anthropic's `mid-conversation-system` beta) join the system prompt."""

    role: Literal["user", "assistant", "system"]
    content: str | list[Block]

    def blocks(self) -> list[Any]:
        if isinstance(self.content, str):
            return [TextBlock(type="text", text=self.content)]
        return list(self.content)


class ToolParam(_Open):
    type: Literal["custom"] | None = None
    name: FunctionName
    description: str | None = None
    input_schema: dict[str, Any]


class ToolChoice(_Open):
    type: Literal["auto", "any", "tool", "none"]
    name: FunctionName | None = None
    disable_parallel_tool_use: bool | None = None

    @model_validator(mode="after")
    def _named(self) -> ToolChoice:
        if self.type == "tool" and not self.name:
            raise ValueError("a `tool` tool_choice needs the tool's `name`")
        return self


def _refuse_server_tools(tools: Any) -> None:
    for tool in tools if isinstance(tools, list) else []:
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind not in (None, "custom"):
            raise ValueError(
                f"tool type `{kind}` is not available on this server: only client tools "
                "(`name`, `description`, `input_schema`)"
            )


class CountTokensParams(_Open):
    """`POST /v1/messages/count_tokens`: the prompt without the sampling fields."""

    model: str
    messages: list[MessageParam] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[ToolParam] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = None

    @model_validator(mode="before")
    @classmethod
    def _checked(cls, data: Any) -> Any:
        check_plain_json(data)
        if isinstance(data, dict):
            _refuse_server_tools(data.get("tools"))
        return data

    def system_text(self) -> str | None:
        if self.system is None or isinstance(self.system, str):
            return self.system or None
        return "\n\n".join(block.text for block in self.system) or None


class MessageCreateParams(CountTokensParams):
    """`POST /v1/messages`; `max_tokens` is required, as Anthropic requires it."""

    max_tokens: int = Field(ge=1)
    stop_sequences: Stop | None = None
    temperature: float | None = Field(default=None, ge=0, le=1)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    stream: bool = False
    metadata: dict[str, Any] | None = None
