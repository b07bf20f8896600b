"""Checks replies against OpenAI's own response schemas.

`data/openai-response-schemas.json` is an extract of the response schemas in OpenAI's
published OpenAPI document (github.com/openai/openai-openapi, `openapi.json`; the commit,
the conversion to JSON Schema 2020-12 and the one derived schema are recorded in its
`source` field).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema

SCHEMAS = Path(__file__).parent / "data" / "openai-response-schemas.json"


@cache
def _document() -> dict[str, Any]:
    return json.loads(SCHEMAS.read_text())


@cache
def _validator(name: str) -> jsonschema.Draft202012Validator:
    document = _document()
    schema = {"$schema": document["$schema"], "$defs": document["$defs"]}
    schema["$ref"] = f"#/$defs/{name}"
    return jsonschema.Draft202012Validator(schema)


def check(name: str, value: Any) -> None:
    """AssertionError listing every way `value` breaks OpenAI's schema `name`."""
    errors = sorted(_validator(name).iter_errors(value), key=lambda e: list(e.path))
    problems = [f"{'/'.join(map(str, e.path)) or '<root>'}: {e.message[:200]}" for e in errors]
    assert not problems, f"{name}: " + "; ".join(problems)


def check_chat(reply: Any) -> None:
    check("CreateChatCompletionResponse", reply)


def check_chunk(chunk: Any) -> None:
    check("CreateChatCompletionStreamResponse", chunk)


def check_completion(reply: Any) -> None:
    check("CreateCompletionResponse", reply)


def check_completion_chunk(chunk: Any) -> None:
    check("CreateCompletionStreamResponse", chunk)


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
