"""What a request asks its reply to look like, as plain values that the proxy (to check a
grammar before the backend builds it) and the workers (to build it, to render the prompt, to
read the reply) derive alike: the tools the model may or must call, and the JSON it must be.

Tools come from `tools` / `tool_choice` / `parallel_tool_calls`, or from the legacy
`functions` / `function_call` (one call at most, answered as `function_call`). `tool_choice`
is `auto` when tools are given (OpenAI's default), `none` keeps them in the prompt but lets no
call through, `required` or a named function forces a call. JSON comes from
`response_format`: `json_object` (any JSON object, or llama.cpp's `schema`) or OpenAI's
`json_schema` (its `schema`; `strict` or not, a grammar makes the reply follow it).

The call format is one for every model: each call the model writes is

    <tool_call>
    {"name": "NAME", "arguments": ARGUMENTS}
    </tool_call>

the Hermes / Qwen format, which their chat templates teach their models (llama.cpp's server
parses it as "Hermes 2 Pro"); for any other template (and for Llama-2, which has no tool
format) the system prompt teaches it. A grammar built from the tools' JSON schemas forces
exactly this text once `<tool_call>` begins (from the first token when a call is forced), and
`format_call` writes a stored call back the same way, so a session's history renders as the
model wrote it and its KV cache stays reusable turn after turn.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

TOOL_OPEN = "<tool_call>"
TOOL_CLOSE = "</tool_call>"
CALL_HEAD = TOOL_OPEN + '\n{"name": "'
ARGS_KEY = '", "arguments": '
CALL_TAIL = "}\n" + TOOL_CLOSE
CALL_SEPARATOR = "\n"


class ReplyFormatError(ValueError):
    """The request's tools or response format cannot be honoured; `param` names the field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def format_call(name: str, arguments: str) -> str:
    """One call exactly as the grammar makes the model write it."""
    return f"{CALL_HEAD}{name}{ARGS_KEY}{arguments}{CALL_TAIL}"


@dataclass(frozen=True)
class ToolDef:
    """A function the model may call; `param` is where its parameters sit in the request."""

    name: str
    description: str | None
    parameters: dict[str, Any]
    param: str

    def as_tool(self) -> dict[str, Any]:
        """OpenAI's tool object, as a prompt or a chat template shows it."""
        function: dict[str, Any] = {"name": self.name}
        if self.description:
            function["description"] = self.description
        function["parameters"] = self.parameters
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolUse:
    """The tools a chat request defines and what it lets the model do with them."""

    tools: tuple[ToolDef, ...]
    choice: str  # "none", "auto", "required" or "named"
    named: str | None = None
    parallel: bool = True
    legacy: bool = False  # functions / function_call: one call, answered as `function_call`

    @property
    def callable(self) -> tuple[ToolDef, ...]:
        """The tools a reply may call: none, the named one, or all."""
        if self.choice == "none":
            return ()
        if self.choice == "named":
            return tuple(t for t in self.tools if t.name == self.named)
        return self.tools

    @property
    def forced(self) -> bool:
        return self.choice in ("required", "named")


@dataclass(frozen=True)
class JsonReply:
    """The reply must be JSON: of `schema`, or any JSON object when it is None; `strict`:
    OpenAI's promise that the reply validates (an engine that cannot keep a keyword refuses)."""

    schema: dict[str, Any] | None
    param: str
    strict: bool = False


@dataclass(frozen=True)
class GrammarSpec:
    """Everything a reply's grammar is built from (see `launcher.json_grammar`)."""

    tools: tuple[ToolDef, ...] = ()
    forced: bool = False
    parallel: bool = True
    json: JsonReply | None = None

    def to_json(self) -> str:
        """The spec as one JSON text (what the proxy's grammar checker sends its child)."""
        tools = [[t.name, t.description, t.parameters, t.param] for t in self.tools]
        reply = [self.json.schema, self.json.param, self.json.strict] if self.json else None
        value = {"tools": tools, "forced": self.forced, "parallel": self.parallel, "json": reply}
        return json.dumps(value)

    @classmethod
    def from_json(cls, text: str) -> GrammarSpec:
        value = json.loads(text)
        reply = value["json"]
        return cls(
            tools=tuple(ToolDef(*t) for t in value["tools"]),
            forced=value["forced"],
            parallel=value["parallel"],
            json=JsonReply(*reply) if reply else None,
        )


def tool_use(body: Any) -> ToolUse | None:
    """The request's tools (or legacy functions) and tool choice; None without any."""
    tools = getattr(body, "tools", None)
    functions = getattr(body, "functions", None)
    if tools and functions:
        raise ReplyFormatError("send `tools` or the older `functions`, not both", "functions")
    if tools:
        defs = tuple(_tool_def(t.function, f"tools.{i}.function") for i, t in enumerate(tools))
        parallel = getattr(body, "parallel_tool_calls", None) is not False
        choice = getattr(body, "tool_choice", None) or "auto"
        named = None if isinstance(choice, str) else choice.function.name
        return _checked(ToolUse(defs, choice if named is None else "named", named, parallel))
    if functions:
        defs = tuple(_tool_def(f, f"functions.{i}") for i, f in enumerate(functions))
        call = getattr(body, "function_call", None) or "auto"
        named = None if isinstance(call, str) else call.name
        use = ToolUse(defs, call if named is None else "named", named, False, legacy=True)
        return _checked(use)
    choice = getattr(body, "tool_choice", None)
    if choice not in (None, "none"):
        raise ReplyFormatError("`tool_choice` needs `tools`", "tool_choice")
    return None


def _tool_def(function: Any, where: str) -> ToolDef:
    parameters = function.parameters
    if parameters is None:
        parameters = {"type": "object", "properties": {}}
    return ToolDef(function.name, function.description, parameters, f"{where}.parameters")


def _checked(use: ToolUse) -> ToolUse:
    names = [t.name for t in use.tools]
    if len(set(names)) != len(names):
        field = "functions" if use.legacy else "tools"
        raise ReplyFormatError(f"`{field}` names a function twice", field)
    if use.choice == "named" and use.named not in names:
        field = "function_call" if use.legacy else "tool_choice"
        raise ReplyFormatError(f"`{field}` names `{use.named}`, which is not defined", field)
    return use


def json_reply(body: Any) -> JsonReply | None:
    """The JSON the reply must be (`response_format`); None for text."""
    response_format = getattr(body, "response_format", None)
    if response_format is None or response_format.type == "text":
        return None
    param, schema = response_format.schema()
    strict = response_format.json_schema is not None and bool(response_format.json_schema.strict)
    return JsonReply(schema, param, strict)


def grammar_spec(body: Any) -> GrammarSpec | None:
    """What the reply's grammar is built from; None when nothing constrains the reply."""
    use = tool_use(body)
    reply = json_reply(body)
    callable_tools = use.callable if use else ()
    if not callable_tools and reply is None:
        return None
    if use is not None and use.forced and reply is not None:
        raise ReplyFormatError(
            "a forced tool call and a JSON `response_format` cannot both shape one reply",
            "response_format",
        )
    forced = bool(use and use.forced)
    parallel = bool(use and use.parallel)
    return GrammarSpec(tools=callable_tools, forced=forced, parallel=parallel, json=reply)
