"""Every reply, stream chunk and error is what OpenAI's published schemas say it is, and
usage is the backend's exact count, streamed or not."""

from __future__ import annotations

import pytest
from support.backend_fixtures import MODEL, NO_EOS
from support.openai_schemas import (
    check,
    check_chat,
    check_chunk,
    check_completion,
    check_completion_chunk,
    check_error,
    check_fingerprint,
    sse_events,
)

pytestmark = pytest.mark.timeout(120)

CHAT = "/v1/chat/completions"
HELLO = {"model": MODEL, "messages": [{"role": "user", "content": "hello there"}]}


def test_chat_reply_and_stream_follow_the_schemas_with_exact_usage(make_proxy) -> None:
    http = make_proxy().http()
    body = {**HELLO, "max_tokens": 8, "logit_bias": NO_EOS, "seed": 3}
    reply = http.post(CHAT, json=body).json()
    check_chat(reply)
    assert reply["choices"][0]["message"]["refusal"] is None
    streamed = http.post(
        CHAT, json={**body, "stream": True, "stream_options": {"include_usage": True}}
    )
    events = sse_events(streamed.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    for chunk in chunks:
        check_chunk(chunk)
    assert all("usage" in c and c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == []
    # the streamed usage is the backend's count, the same as the unstreamed reply's
    assert chunks[-1]["usage"] == reply["usage"]
    assert reply["usage"]["completion_tokens"] == 8  # stopped by max_tokens, every token counted
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1])
    assert text == reply["choices"][0]["message"]["content"]  # same seed, same reply
    # without include_usage: no usage anywhere
    plain = sse_events(http.post(CHAT, json={**body, "stream": True}).text)[:-1]
    assert all("usage" not in c for c in plain) and all(c["choices"] for c in plain)
    # one build, one fingerprint: the reply and every chunk of both streams
    assert {check_fingerprint(c) for c in [reply, *chunks, *plain]} == {reply["system_fingerprint"]}


def test_the_checks_refuse_a_null_or_missing_fingerprint() -> None:
    """OpenAI's schema types `system_fingerprint` as a string: a null fails it, and llmup's
    own check also fails an object without one (objects and chunks alike)."""
    reply = {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": MODEL,
        "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                     "message": {"role": "assistant", "content": "hi", "refusal": None}}],
    }  # fmt: skip
    chunk = {
        "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": MODEL,
        "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None,
                     "logprobs": None}],
    }  # fmt: skip
    for value, checker in ((reply, check_chat), (chunk, check_chunk)):
        checker({**value, "system_fingerprint": "fp_0123456789"})
        for bad in ({"system_fingerprint": None}, {}, {"system_fingerprint": "build 7"}):
            with pytest.raises(AssertionError):
                checker({**value, **bad})
    with pytest.raises(AssertionError, match="system_fingerprint"):
        check("CreateChatCompletionStreamResponse", {**chunk, "system_fingerprint": None})


def test_completions_follow_the_schemas_with_exact_usage(make_proxy) -> None:
    http = make_proxy().http()
    body = {"model": MODEL, "prompt": "hello world", "max_tokens": 6, "logit_bias": NO_EOS}
    reply = http.post("/v1/completions", json=body).json()
    check_completion(reply)
    stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
    chunks = sse_events(http.post("/v1/completions", json=stream).text)[:-1]
    for chunk in chunks:
        check_completion_chunk(chunk)
    assert chunks[-1]["usage"] == reply["usage"] == {
        "prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9,
    }  # fmt: skip
    assert all(c["usage"] is None for c in chunks[:-1])
    assert {check_fingerprint(c) for c in chunks} == {reply["system_fingerprint"]}


def test_errors_follow_the_schema_with_openai_types_and_codes(make_proxy) -> None:
    proxy = make_proxy(api_keys=["k"])
    http, anonymous = proxy.http("k"), proxy.http()
    cases = [
        (anonymous.get("/v1/models"), 401, "invalid_request_error", "invalid_api_key"),
        (http.post(CHAT, json={**HELLO, "model": "gpt-4"}), 404, "invalid_request_error",
         "model_not_found"),
        (http.post(CHAT, json={**HELLO, "max_tokens": "x"}), 400, "invalid_request_error",
         "invalid_type"),
        (http.post(CHAT, json={**HELLO, "temperature": 9}), 400, "invalid_request_error",
         "invalid_value"),
        (http.post(CHAT, json={"model": MODEL}), 400, "invalid_request_error",
         "missing_required_parameter"),
        (http.get("/v1/nowhere"), 404, "invalid_request_error", "not_found"),
    ]  # fmt: skip
    for response, status, kind, code in cases:
        assert response.status_code == status, response.text
        check_error(response.json())
        error = response.json()["error"]
        assert (error["type"], error["code"]) == (kind, code), error
    assert cases[2][0].json()["error"]["param"] == "max_tokens"
    assert "Invalid URL (GET /v1/nowhere)" in cases[5][0].json()["error"]["message"]
    models = http.get("/v1/models").json()
    check("ListModelsResponse", models)
    assert models["data"][0]["id"] == MODEL
