"""Property-based run over the proxy's own OpenAPI schema: no input makes it answer 5xx.

Schemathesis generates valid and invalid requests for every operation (its pytest plugin does
not support pytest 9 yet, so hypothesis drives its strategies here) and sends them to the
proxy served by uvicorn in front of the real tiny backend. Generated bodies name the served
model and ask for few tokens, so most reach the backend instead of stopping at a 404. The
schema types llama.cpp's own fields (`grammar`, `top_k`, `min_p`, `mirostat_*`, ...),
tools, functions and `logit_bias`, so generated bodies carry them to the backend too; the
backend must never be restarted by any of them.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis.generation import GenerationMode

# Imported here, at collection, not lazily by `from_url` inside the fixture: pytest rewrites the
# modules of every package that ships a pytest plugin (schemathesis does) when they are first
# imported, and CPython 3.11.7's AST constructor can fail spuriously while other threads run
# ("SystemError: AST constructor recursion depth mismatch", python/cpython#106905), as they do
# once the proxy's uvicorn thread is up.
from schemathesis.specs.openapi import schemas as _openapi_schemas  # noqa: F401
from support.backend_fixtures import MODEL, proxy_settings, serve_proxy, served
from support.openai_schemas import (
    check_chat,
    check_chunk,
    check_completion,
    check_completion_chunk,
    sse_events,
)
from support.worker_fixtures import SlotWorker, write_chat_model

from launcher.served import StaticBackend, WorkerKind

pytestmark = pytest.mark.timeout(300)
EXAMPLES = 60  # per operation and mode
BYTE_TOKENS = {str(token): -100 for token in range(3, 259)}
# schemathesis gives up on a reply after 10 s by default; a long generated prompt with tools
# and n choices can take longer on a busy 2-core machine, and this file judges shapes, not speed
REPLY_TIMEOUT_S = 180


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory, tiny_backend):
    home = tmp_path_factory.mktemp("schema-home")
    proxy = serve_proxy(proxy_settings(home, max_body_bytes=256 * 1024), served(tiny_backend))
    yield schemathesis.openapi.from_url(proxy.url + "/openapi.json")
    proxy.stop()


def aim(body: Any) -> Any:
    """Point a generated body at the served model and keep its generation short."""
    if not isinstance(body, dict):
        return body
    if isinstance(body.get("model"), str):
        body["model"] = MODEL
    for field in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        if isinstance(body.get(field), int) and body[field] > 4:
            body[field] = 4
    if "messages" in body or "prompt" in body:
        body.setdefault("max_tokens", 4)
        # No byte tokens: the random tiny model strings lead bytes into endless invalid UTF-8,
        # which llama-cpp-python holds back past max_tokens (a real model's output is valid).
        # Generated biases for other token ids stay.
        generated = body.get("logit_bias")
        body["logit_bias"] = {**(generated if isinstance(generated, dict) else {}), **BYTE_TOKENS}
    return body


# Routes whose bodies cannot carry `logit_bias` (Anthropic's and the Responses API's): the
# tiny model's byte tokens cannot be banned there, so their generated bodies name another
# model (a 404 after the body was validated) rather than start an endless reply.
NO_BIAS_ROUTES = ("/messages", "/responses")


def check(case: Any, seen: Counter) -> None:
    if hasattr(case, "body"):
        case.body = aim(case.body)
        if case.path.endswith(NO_BIAS_ROUTES) and isinstance(case.body, dict):
            case.body["model"] = "not-" + MODEL
        if isinstance(case.body, dict):
            seen.update(f"field:{name}" for name in case.body)
    response = case.call(timeout=REPLY_TIMEOUT_S)
    seen[(case.path, response.status_code // 100)] += 1
    assert response.status_code < 500, (case.method, case.path, response.text[:300], case.body)
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["message"] and error["type"]


def operations(api_schema) -> list:
    return [result.ok() for result in api_schema.get_all_operations()]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_server_error(api_schema, tiny_backend, mode) -> None:
    restarts = tiny_backend.restarts
    ops = operations(api_schema)
    assert {op.path for op in ops} >= {"/v1/chat/completions", "/v1/sessions/{session_id}"}
    exercised, seen = [], Counter()
    for operation in ops:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def run(case: Any) -> None:
            check(case, seen)

        try:
            run()
        except Unsatisfiable:  # nothing invalid to send (an operation without inputs)
            continue
        exercised.append(operation.path)
    assert "/v1/chat/completions" in exercised and "/v1/completions" in exercised
    if mode == GenerationMode.POSITIVE:  # valid requests did reach the model
        assert seen[("/v1/chat/completions", 2)] > 0 and seen[("/v1/completions", 2)] > 0
        # llama.cpp's fields are in most generated bodies (each in 8-37 of ~120 per run, seen)
        backend_fields = ("grammar", "top_k", "min_p", "mirostat_mode", "repeat_penalty")
        assert all(seen[f"field:{name}"] > 0 for name in backend_fields), seen
    else:
        assert seen[("/v1/chat/completions", 4)] > 0
    assert tiny_backend.restarts == restarts and tiny_backend.state == "ready"


@pytest.fixture(scope="module")
def slots_schema(tmp_path_factory):
    """The proxy in front of llmup's slot worker (the default backend), which takes tools,
    JSON replies, log probabilities and n."""
    folder = tmp_path_factory.mktemp("schema-slots")
    worker = SlotWorker.start(write_chat_model(folder), folder / "slots", "--parallel", "2")
    backend = StaticBackend(
        base_url=worker.url, model_id=MODEL, context=4096, kind=WorkerKind.LLAMACPP_SLOTS
    )
    worker.model = MODEL
    proxy = serve_proxy(proxy_settings(folder / "home", max_body_bytes=256 * 1024), backend)
    yield schemathesis.openapi.from_url(proxy.url + "/openapi.json"), worker
    proxy.stop()
    worker.stop()


GENERATION = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}
TOOL = {"type": "function", "function": {"name": "f", "parameters": {
    "type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}}}  # fmt: skip
JSON_REPLY = {"type": "json_schema", "json_schema": {"name": "r", "schema": TOOL["function"][
    "parameters"]}}  # fmt: skip
# the new surface, drawn on top of each generated body (few generated bodies carry it)
EXTRAS = {
    "chat": st.fixed_dictionaries({}, optional={
        "n": st.integers(1, 3), "logprobs": st.booleans(), "top_logprobs": st.integers(0, 5),
        "tools": st.just([TOOL]), "tool_choice": st.sampled_from(["auto", "none", "required"]),
        "parallel_tool_calls": st.booleans(), "stream": st.booleans(),
        "response_format": st.sampled_from([{"type": "json_object"}, JSON_REPLY]),
    }),
    "completion": st.fixed_dictionaries({}, optional={
        "n": st.integers(1, 3), "logprobs": st.integers(0, 5), "echo": st.booleans(),
        "stream": st.booleans(), "response_format": st.just(JSON_REPLY),
    }),
}  # fmt: skip


def check_shapes(case: Any, extra: dict, seen: Counter) -> None:
    """No 5xx, and every reply (and every chunk) in OpenAI's published shape."""
    if isinstance(case.body, dict):
        case.body = {**case.body, **extra}
    case.body = aim(case.body)
    if isinstance(case.body, dict):
        seen.update(f"field:{name}" for name in case.body)
    response = case.call(timeout=REPLY_TIMEOUT_S)
    seen[response.status_code // 100] += 1
    assert response.status_code < 500, (case.path, response.text[:300], case.body)
    if response.status_code != 200:
        return
    if isinstance(case.body, dict):
        seen.update(f"answered:{name}" for name in case.body)
    kind = GENERATION[case.path]
    content_type = response.headers.get("content-type") or ""  # schemathesis: a list
    if "text/event-stream" in str(content_type):
        for chunk in sse_events(response.text)[:-1]:
            if "error" not in chunk:
                (check_chunk if kind == "chat" else check_completion_chunk)(chunk)
        return
    (check_chat if kind == "chat" else check_completion)(response.json())


def test_the_slot_worker_answers_generated_requests_in_openais_shapes(slots_schema) -> None:
    api_schema, worker = slots_schema
    seen: Counter = Counter()
    for operation in operations(api_schema):
        if operation.path not in GENERATION:
            continue

        strategy = operation.as_strategy(generation_mode=GenerationMode.POSITIVE)

        @given(case=strategy, extra=EXTRAS[GENERATION[operation.path]])
        @settings(
            max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        def run(case: Any, extra: dict) -> None:
            check_shapes(case, extra, seen)

        run()
        if operation.path == "/v1/chat/completions":
            answer_each_new_field(operation, seen)
    assert seen[2] > 0, seen
    for name in SURFACE:  # each new field answered (in a drawn body or in its own) and checked
        assert seen[f"answered:{name}"] > 0, seen
    assert worker.proc.poll() is None  # nothing generated took the worker down


# one plain body per field of the new surface: a draw may leave a field out of every body
# the backend accepts (seen, 1 run in 6), so each is also sent on its own and checked
SURFACE = {
    "tools": {"tools": [TOOL], "tool_choice": "required"},
    "logprobs": {"logprobs": True, "top_logprobs": 2},
    "n": {"n": 2},
    "response_format": {"response_format": JSON_REPLY},
    "stream": {"stream": True, "n": 2, "logprobs": True},
}


def answer_each_new_field(operation: Any, seen: Counter) -> None:
    for fields in SURFACE.values():
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **fields}
        check_shapes(operation.Case(body=body), {}, seen)
