"""OpenAI wire models shared by the proxy and the backend workers.

Names follow OpenAI's API reference so a reader can check a field against the spec. Every
field a server acts on is typed here, so a wrong value is a 400 naming it, never a failure
further down. Requests accept unknown fields (``extra="allow"``, as OpenAI's clients send
fields a server may not know) and ignore them: they are neither used nor forwarded. A body
must be plain JSON text: no string with a lone UTF-16 surrogate (it cannot be encoded as
UTF-8, so it could not be forwarded or stored) and no nesting deeper than `MAX_JSON_DEPTH`.
Plain data only: no FastAPI import, so both the proxy and a worker process can use this
module without importing each other.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

# The proxy names a request's session to llmup's own workers on these private headers: the
# owner (a hash of the caller's API key, never the key) and the session id.
BACKEND_OWNER_HEADER = "X-Llmup-Owner"
BACKEND_SESSION_HEADER = "X-Llmup-Session"
# The slot worker logs one of these once its KV cache, started with one sequence, reached the
# planned size or gave up: the launcher records the load's buffers after it (calibration).
KV_GROWN_LINE = "KV cache grown to"
KV_NOT_GROWN_LINES = ("the KV cache could not grow", "the KV cache keeps")

Role = Literal["system", "developer", "user", "assistant", "tool", "function"]
FinishReason = Literal["stop", "length", "content_filter", "tool_calls", "function_call"]
MAX_JSON_DEPTH = 64
# A worker's facts the proxy checks requests against (`{"n_vocab": ..., "n_ctx": ...}`) and
# what identifies the build it serves (`identity`, for the replies' `system_fingerprint`).
META_PATH = "/llmup/meta"
# A request's prompt as the worker renders and tokenizes it (`PromptTokens`): the one count
# of a prompt's length that the proxy acts on.
PROMPT_TOKENS_PATH = "/llmup/prompt-tokens"
# OpenAI's (and llama_cpp.server's) max_tokens for legacy completions when none is given;
# a worker gives the reply at most this, and never more than the context has left.
COMPLETION_DEFAULT_MAX_TOKENS = 16
MAX_TOOLS = 128
# `stop`: OpenAI allows 4 strings; llmup takes up to 16 of at most 256 characters each (a
# worker matches all of them on every token, so an unbounded list would stall it).
MAX_STOPS = 16
MAX_STOP_CHARS = 256
# OpenAI's rule for function names; it also keeps them safe inside a generated grammar
FunctionName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
TokenId = Annotated[str, Field(pattern=r"^[0-9]{1,9}$")]


def _bounded_stop(value: Any) -> Any:
    """Refuse too many or too long stop strings before anything iterates them; the type
    itself is pydantic's to check."""
    stops = [value] if isinstance(value, str) else value
    if isinstance(stops, list) and (
        len(stops) > MAX_STOPS or any(isinstance(s, str) and len(s) > MAX_STOP_CHARS for s in stops)
    ):
        raise PydanticCustomError(
            "too_long",
            "takes at most {n} strings of at most {chars} characters each",
            {"n": MAX_STOPS, "chars": MAX_STOP_CHARS},
        )
    return value


Stop = Annotated[str | list[str], BeforeValidator(_bounded_stop)]


def check_plain_json(data: Any) -> None:
    """Refuse a lone surrogate anywhere (keys too) or nesting past MAX_JSON_DEPTH, naming
    the place; iterative, so a hostile body cannot exhaust the stack."""
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            _refuse(path.split(".")[0], f"is nested deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(value, str):
            _check_text(value, path)
        elif isinstance(value, dict):
            for key, item in value.items():
                _check_text(str(key), path)
                stack.append((item, f"{path}.{key}" if path else str(key), depth + 1))
        elif isinstance(value, list):
            stack.extend((item, f"{path}.{i}", depth + 1) for i, item in enumerate(value))


def _check_text(text: str, path: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        _refuse(path, "contains a lone UTF-16 surrogate (\\ud800-\\udfff), which is not text")


def _refuse(path: str, why: str) -> None:
    where = f"`{path}` " if path else "the body "
    raise PydanticCustomError("invalid_json_value", where + why, {"param": path or None})


class _Open(BaseModel):
    """A part of a request: unknown fields are dropped."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class _Request(_Open):
    """A whole request body: unknown fields are accepted (and ignored by whoever reads the
    model); checked to be plain JSON text before its fields are read."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _plain_json(cls, data: Any) -> Any:
        check_plain_json(data)
        return data


class _Wire(BaseModel):
    """Response side: extra fields allowed so a backend's additions survive a round trip."""

    model_config = ConfigDict(extra="allow")


class _EndedChoice(_Wire):
    """A choice's end. `stop_reason` names the stop string that ended it, as vLLM's replies
    do (Anthropic's Messages API reports it as `stop_sequence`); it is left out of the JSON
    unless a stop string did, so other replies stay exactly OpenAI's."""

    finish_reason: FinishReason | None = None
    logprobs: Any | None = None
    stop_reason: str | None = None

    @model_serializer(mode="wrap")
    def _stop_reason_when_set(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        if data.get("stop_reason") is None:
            data.pop("stop_reason", None)
        return data


# ---- requests -----------------------------------------------------------------------------


class FunctionCall(_Open):
    name: str
    arguments: str


class ToolCall(_Open):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Open):
    role: Role
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    function_call: FunctionCall | None = None  # the legacy functions API's one call

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


class JsonSchemaFormat(_Open):
    """OpenAI's `response_format.json_schema`: the reply is JSON of `schema` (a grammar makes
    it so, whether or not `strict` is set)."""

    name: str | None = Field(default=None, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Open):
    type: Literal["text", "json_object", "json_schema"] = "text"
    schema_: dict[str, Any] | None = Field(
        default=None, alias="schema", description="llama.cpp: the JSON schema a json_object follows"
    )
    json_schema: JsonSchemaFormat | None = None

    def schema(self) -> tuple[str, dict[str, Any] | None]:
        """(where it was given, the JSON schema the reply must follow): OpenAI's
        `json_schema.schema`, else llama.cpp's `schema`; None for any JSON object."""
        if self.json_schema is not None and self.json_schema.schema_ is not None:
            return "response_format.json_schema.schema", self.json_schema.schema_
        return "response_format.schema", self.schema_


class FunctionDefinition(_Open):
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @model_validator(mode="after")
    def _no_parameters_is_an_empty_list(self) -> FunctionDefinition:
        """OpenAI reads a function without `parameters` as one that takes none; llama.cpp
        requires the field, so it is always set (and forwarded)."""
        if self.parameters is None:
            self.parameters = {"type": "object", "properties": {}}
        return self


class Tool(_Open):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Open):
    name: FunctionName


class NamedToolChoice(_Open):
    type: Literal["function"]
    function: NamedFunction


class _SamplingRequest(_Request):
    """Fields chat and legacy completions share."""

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    stop: Stop | None = Field(
        default=None,
        description=f"up to {MAX_STOPS} strings of at most {MAX_STOP_CHARS} characters each",
    )
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(default=1, ge=1)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[TokenId, Annotated[float, Field(ge=-100, le=100)]] | None = None
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
    tools: list[Tool] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: list[FunctionDefinition] | None = Field(default=None, max_length=MAX_TOOLS)
    function_call: Literal["none", "auto"] | NamedFunction | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    def requested_max_tokens(self) -> int | None:
        """`max_completion_tokens` replaced `max_tokens` in the spec; either is honoured."""
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = False
    suffix: str | None = None
    logprobs: int | None = Field(default=None, ge=0, le=5)
    response_format: ResponseFormat | None = None  # llama.cpp's: the text follows a schema

    @model_validator(mode="after")
    def _nothing_to_echo(self) -> CompletionRequest:
        """Echoing an empty prompt adds nothing to the reply, and llama_cpp.server answers
        `echo` with an empty prompt with a 500: it is sent as no echo."""
        if self.echo and self.prompt in ("", []):
            self.echo = False
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


class TokenizeInputRequest(_Request):
    """llama_cpp.server's `/extras/tokenize` body, so one proxy route serves both backends."""

    model: str | None = None
    input: str


# ---- responses ----------------------------------------------------------------------------


def backend_headers(owner: str, session_id: str | None) -> dict[str, str]:
    """The caller and its session for slot-keeping workers, on private headers: the owner
    (a hash of the key, empty without keys) and the id, so two keys never share one; the
    owner alone on a stateless request, whose cached prompt only that owner may continue.
    Other backends ignore them."""
    if session_id is None:
        return {BACKEND_OWNER_HEADER: owner}
    return {BACKEND_OWNER_HEADER: owner, BACKEND_SESSION_HEADER: session_id}


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
    """`tool_calls` (or the legacy `function_call`) only when the model called something:
    OpenAI's schema has them as optional, never null."""

    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None  # required (nullable) in OpenAI's schema
    tool_calls: list[dict[str, Any]] | None = None
    function_call: dict[str, Any] | None = None

    @model_serializer(mode="wrap")
    def _no_null_calls(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        for name in ("tool_calls", "function_call"):
            if data.get(name) is None:
                data.pop(name, None)
        return data


class Choice(_EndedChoice):
    index: int = 0
    message: ChatCompletionMessage


class ChatCompletionResponse(_Wire):
    id: str = Field(default_factory=lambda: new_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[Choice]
    usage: Usage | None = None


class ChoiceDelta(_Wire):
    """A streamed delta carries only the fields that changed, as OpenAI sends it."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    function_call: dict[str, Any] | None = None

    @model_serializer(mode="wrap")
    def _drop_none(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChunkChoice(_EndedChoice):
    index: int = 0
    delta: ChoiceDelta


class ChatCompletionChunk(_Wire):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class CompletionChoice(_EndedChoice):
    index: int = 0
    text: str


class CompletionResponse(_Wire):
    id: str = Field(default_factory=lambda: new_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


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


class PromptTokens(_Wire):
    """A worker's count of a request's prompt, rendered (chat template) and tokenized exactly
    as it would generate from it. `context` is the most prompt + reply tokens one request may
    use there; `message_tokens` are each chat message's content tokens (what a session's
    stored turns are weighed by when the proxy chooses which old ones to leave out)."""

    prompt_tokens: int
    context: int
    message_tokens: list[int] | None = None


def context_length_message(context: int, prompt: int, completion: int, what: str) -> str:
    """OpenAI's wording for a request that does not fit (`what`: messages or prompt), from
    one place so the proxy and the workers say it alike."""
    return (
        f"This model's maximum context length is {context} tokens. However, you requested "
        f"{prompt + completion} tokens ({prompt} in the {what}, {completion} in the "
        f"completion). Please reduce the length of the {what} or max_tokens."
    )


def system_fingerprint(identity: Mapping[str, Any]) -> str:
    """OpenAI's `system_fingerprint`: `fp_` and 10 hex digits of a digest of what identifies
    the served build (llmup and backend versions, the model file, the load settings), so it
    is the same for every reply of one build and changes when any of them does."""
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return "fp_" + hashlib.sha256(text.encode()).hexdigest()[:10]


class TokenizeInputResponse(_Wire):
    tokens: list[int]


class TokenizeInputCountResponse(_Wire):
    count: int


# ---- errors -------------------------------------------------------------------------------

# `error.type` as OpenAI's API sends it: a client error is an invalid request (also a bad
# key or an unknown model), a full queue is a "requests" rate limit, anything else a 5xx.
_ERROR_TYPES = {429: "requests"}


class ErrorDetail(_Wire):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Wire):
    error: ErrorDetail


def error_type_for_status(status: int) -> str:
    """OpenAI's `error.type` for an HTTP status."""
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
