"""Anthropic's Messages API on llmup's slot worker, through the official anthropic client:
replies and every stream event parse as the SDK's own types, in Anthropic's order; the key
comes as `x-api-key`; errors are Anthropic-shaped with the right status and change nothing;
count_tokens is the backend's count; a session named by X-Session-Id reuses its KV cache."""

from __future__ import annotations

import json

import anthropic
import httpx
import pytest
from anthropic.types import Message, MessageTokensCount, RawMessageStreamEvent
from pydantic import TypeAdapter

from launcher.proxy.messages.convert import chat_messages
from launcher.proxy.messages.models import MessageCreateParams

EVENT = TypeAdapter(RawMessageStreamEvent)


@pytest.fixture(scope="module")
def proxy(slot_proxy):
    return slot_proxy


def client(proxy, key: str = "key-a", **kw) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=proxy.url, api_key=key, max_retries=0, **kw)


def raw_message(proxy, body: dict, headers: dict | None = None) -> httpx.Response:
    return httpx.post(
        proxy.url + "/v1/messages", json=body, timeout=60, trust_env=False,
        headers={"x-api-key": "key-a", "anthropic-version": "2023-06-01", **(headers or {})},
    )  # fmt: skip


def test_a_message_parses_as_the_sdks_type(proxy) -> None:
    body = {"model": "tiny", "max_tokens": 6, "system": "be brief",
            "messages": [{"role": "user", "content": "hello world"}]}  # fmt: skip
    reply = raw_message(proxy, body)
    assert reply.status_code == 200, reply.text
    message = Message.model_validate(reply.json())
    assert message.id.startswith("msg_") and message.role == "assistant"
    assert message.content[0].type == "text" and message.stop_reason in ("end_turn", "max_tokens")
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0
    made = client(proxy).messages.create(
        model="tiny", max_tokens=4, messages=[{"role": "user", "content": "the time"}]
    )
    assert made.type == "message" and made.usage.output_tokens <= 4


def test_a_stream_is_anthropics_events_in_order(proxy) -> None:
    # greedy: a random-weight model sampled at the default temperature may end at once
    body = {"model": "tiny", "max_tokens": 6, "stream": True, "temperature": 0,
            "messages": [{"role": "user", "content": "hello world"}]}  # fmt: skip
    with httpx.stream("POST", proxy.url + "/v1/messages", json=body, trust_env=False,
                      headers={"x-api-key": "key-a"}, timeout=60) as reply:  # fmt: skip
        assert reply.status_code == 200
        lines = [line for line in reply.iter_lines() if line]
    names = [line[7:] for line in lines if line.startswith("event: ")]
    events = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
    assert [e["type"] for e in events] == names
    kinds = [e["type"] for e in events if e["type"] != "ping"]
    for event in events:
        if event["type"] != "ping":
            EVENT.validate_python(event)
    assert kinds[:2] == ["message_start", "content_block_start"]
    assert set(kinds[2:-3]) == {"content_block_delta"}
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert events[-2]["usage"]["output_tokens"] > 0 and events[-2]["usage"]["input_tokens"] > 0
    with client(proxy).messages.stream(
        model="tiny", max_tokens=5, messages=[{"role": "user", "content": "some thing"}]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert final.content[0].text == text and final.usage.input_tokens > 0


def test_count_tokens_is_the_backends_count(proxy) -> None:
    sdk = client(proxy)
    one = sdk.messages.count_tokens(model="tiny", messages=[{"role": "user", "content": "hi"}])
    two = sdk.messages.count_tokens(
        model="tiny", system="be brief",
        messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                  {"role": "user", "content": "the time"}],
    )  # fmt: skip
    assert isinstance(one, MessageTokensCount) and two.input_tokens > one.input_tokens > 0


def test_errors_are_anthropic_shaped_and_change_nothing(proxy) -> None:
    sessions = proxy.http("key-a").get("/v1/sessions").json()["data"]
    cases = [
        ({"model": "tiny", "messages": [{"role": "user", "content": "x"}]}, 400,
         "invalid_request_error"),  # no max_tokens
        ({"model": "tiny", "max_tokens": 4,
          "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, 400,
         "invalid_request_error"),
        ({"model": "claude-x", "max_tokens": 4, "messages": [{"role": "user", "content": "x"}]},
         404, "not_found_error"),
    ]  # fmt: skip
    for body, status, kind in cases:
        reply = raw_message(proxy, body, {"X-Session-Id": "never"})
        assert reply.status_code == status, reply.text
        assert reply.json()["type"] == "error" and reply.json()["error"]["type"] == kind
    assert proxy.http("key-a").get("/v1/sessions").json()["data"] == sessions
    refused = httpx.post(proxy.url + "/v1/messages", json={}, trust_env=False)
    assert refused.status_code == 401
    assert refused.json() == {"type": "error", "error": {
        "type": "authentication_error", "message": refused.json()["error"]["message"]}}  # fmt: skip
    with pytest.raises(anthropic.AuthenticationError):
        client(proxy, "wrong").messages.create(
            model="tiny", max_tokens=4, messages=[{"role": "user", "content": "x"}]
        )
    with pytest.raises(anthropic.NotFoundError):
        client(proxy).messages.create(
            model="claude-x", max_tokens=4, messages=[{"role": "user", "content": "x"}]
        )
    # other routes keep OpenAI's shape, and x-api-key works there too
    models = httpx.get(proxy.url + "/v1/models", headers={"x-api-key": "key-b"}, trust_env=False)
    assert models.status_code == 200
    assert "error" in httpx.get(proxy.url + "/v1/models", trust_env=False).json()


def test_a_session_keeps_the_conversation_and_its_kv(proxy) -> None:
    sdk = client(proxy, default_headers={"X-Session-Id": "claude-1"})
    history = [{"role": "user", "content": "hello world the time"}]
    first = sdk.messages.create(model="tiny", max_tokens=6, messages=history)
    history += [{"role": "assistant", "content": first.content[0].text},
                {"role": "user", "content": "what some thing"}]  # fmt: skip
    second = sdk.messages.create(model="tiny", max_tokens=6, messages=history)
    assert second.usage.cache_read_input_tokens >= first.usage.input_tokens
    stored = proxy.http("key-a").get("/v1/sessions/claude-1").json()
    assert stored["turns"] == 2 and [m["role"] for m in stored["messages"]] == [
        "user", "assistant", "user", "assistant"]  # fmt: skip


def test_tool_blocks_become_chat_tool_calls_and_results() -> None:
    params = MessageCreateParams.model_validate({
        "model": "m", "max_tokens": 9, "system": [{"type": "text", "text": "sys"}],
        "messages": [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": [
                {"type": "text", "text": "checking"},
                {"type": "tool_use", "id": "tu_1", "name": "get_weather",
                 "input": {"city": "Oslo"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "tu_1", "content": "rain"},
                {"type": "text", "text": "thanks"}]},
        ],
    })  # fmt: skip
    assert chat_messages(params) == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "checking", "tool_calls": [
            {"id": "tu_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "content": "rain", "tool_call_id": "tu_1"},
        {"role": "user", "content": "thanks"},
    ]  # fmt: skip


def test_max_tokens_is_a_ceiling_and_mid_conversation_system_joins_the_system(proxy) -> None:
    """Claude Code asks for 32,000 tokens whatever the model and sends `system` messages
    among the messages: the reply gets what the context has left, the system text goes
    first."""
    body = {"model": "tiny", "max_tokens": 32000, "system": "be brief",
            "messages": [{"role": "user", "content": "hello world"},
                         {"role": "system", "content": "agents: none"}]}  # fmt: skip
    reply = raw_message(proxy, body)
    assert reply.status_code == 200, reply.text
    assert Message.model_validate(reply.json()).usage.output_tokens > 0
    params = MessageCreateParams.model_validate(body)
    assert chat_messages(params) == [
        {"role": "system", "content": "be brief\n\nagents: none"},
        {"role": "user", "content": "hello world"},
    ]


def test_a_stop_sequence_that_ends_the_reply_is_reported(proxy) -> None:
    """Greedy twice: the second reply ends at a stop string taken from the middle of the
    first, and says so (`stop_sequence`), streamed and not. (SDK 2.x has no sampling
    arguments any more: temperature goes in the body as older clients send it.)"""
    sdk = client(proxy)
    ask = {"model": "tiny", "max_tokens": 16, "extra_body": {"temperature": 0},
           "messages": [{"role": "user", "content": "tell me the time"}]}  # fmt: skip
    full = sdk.messages.create(**ask).content[0].text
    assert len(full) >= 6, full
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    cut = sdk.messages.create(**ask, stop_sequences=[stop, "never-in-the-reply"])
    assert (cut.stop_reason, cut.stop_sequence) == ("stop_sequence", stop)
    assert cut.content[0].text == full[: full.index(stop)]
    with sdk.messages.stream(**ask, stop_sequences=[stop]) as stream:
        final = stream.get_final_message()
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", stop)
    plain = sdk.messages.create(**ask, stop_sequences=["never-in-the-reply"])
    assert plain.stop_reason in ("end_turn", "max_tokens") and plain.stop_sequence is None
