"""Checks replies against OpenAI's own response schemas.

`data/openai-response-schemas.json` is an extract of the response schemas in OpenAI's
published OpenAPI document (github.com/openai/openai-openapi, `openapi.json`; the commit,
the conversion to JSON Schema 2020-12 and the one derived schema are recorded in its
`source` field); `data/openai-responses-schemas.json` the Responses and Conversations APIs'
schemas from the same commit (made by `vendor_openai_schemas.py`, see its `source`).

On top of the schemas (where `system_fingerprint` is an optional string), llmup's own
promise: every chat and completion object and chunk carries a fingerprint, OpenAI-style
(`fp_` and hex), never null.
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema

SCHEMAS = Path(__file__).parents[1] / "data" / "openai-response-schemas.json"
RESPONSES_SCHEMAS = SCHEMAS.with_name("openai-responses-schemas.json")
FINGERPRINT = re.compile(r"fp_[0-9a-f]{10}")


@cache
def _document(path: Path = SCHEMAS) -> dict[str, Any]:
    return json.loads(path.read_text())


@cache
def _validator(name: str, path: Path = SCHEMAS) -> jsonschema.Draft202012Validator:
    document = _document(path)
    schema = {"$schema": document["$schema"], "$defs": document["$defs"]}
    schema["$ref"] = f"#/$defs/{name}"
    return jsonschema.Draft202012Validator(schema)


def check_responses(name: str, value: Any) -> None:
    """`check` against the Responses and Conversations APIs' schemas (`Response`,
    `ResponseStreamEvent`, `ResponseItemList`, `ConversationResource`, ...)."""
    check(name, value, RESPONSES_SCHEMAS)


def check(name: str, value: Any, path: Path = SCHEMAS) -> None:
    """AssertionError listing every way `value` breaks OpenAI's schema `name`."""
    errors = sorted(_validator(name, path).iter_errors(value), key=lambda e: list(e.path))
    problems = [f"{'/'.join(map(str, e.path)) or '<root>'}: {e.message[:200]}" for e in errors]
    assert not problems, f"{name}: " + "; ".join(problems)


def check_fingerprint(value: Any) -> str:
    """The object's `system_fingerprint`, which must be there and a string like OpenAI's."""
    fingerprint = value.get("system_fingerprint") if isinstance(value, dict) else None
    assert isinstance(fingerprint, str), f"system_fingerprint is {fingerprint!r}, not a string"
    assert FINGERPRINT.fullmatch(fingerprint), fingerprint
    return fingerprint


def check_chat(reply: Any) -> None:
    check("CreateChatCompletionResponse", reply)
    check_fingerprint(reply)


def check_chunk(chunk: Any) -> None:
    check("CreateChatCompletionStreamResponse", chunk)
    check_fingerprint(chunk)


def check_completion(reply: Any) -> None:
    check("CreateCompletionResponse", reply)
    check_fingerprint(reply)


def check_completion_chunk(chunk: Any) -> None:
    check("CreateCompletionStreamResponse", chunk)
    check_fingerprint(chunk)


def check_error(body: Any) -> None:
    check("ErrorResponse", body)


def sse_events(text: str) -> list[Any]:
    """The JSON events of an SSE body, `[DONE]` as the string."""
    events = []
    for line in text.splitlines():
        if line.startswith("data:"):
            data = line[5:].strip()
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


@cache
def _event_schemas() -> dict[str, str]:
    """Each Responses stream event type -> the name of its schema (`ResponseStreamEvent`'s
    members), so an event is checked against its own schema with readable errors."""
    defs = _document(RESPONSES_SCHEMAS)["$defs"]
    named = {}
    for member in defs["ResponseStreamEvent"]["anyOf"]:
        name = member["$ref"].rsplit("/", 1)[-1]
        for kind in defs[name]["properties"]["type"].get("enum", []):
            named[kind] = name
    return named


def check_response_event(event: Any) -> None:
    """A Responses stream event against its own schema (and so `ResponseStreamEvent`)."""
    name = _event_schemas().get(event.get("type"))
    assert name is not None, f"no stream event of type {event.get('type')!r} in OpenAI's spec"
    check_responses(name, event)
