"""Tools through the Responses and Messages APIs on llmup's slot worker: a forced call comes
back as a `function_call` item or a `tool_use` block (streamed as argument deltas or
`input_json_delta`s, every event valid), its result goes back as a `function_call_output`
item on the chain or a `tool_result` block in a session, and the turn after the call reuses
the session's KV cache."""

from __future__ import annotations

import json

import anthropic
import pytest
from anthropic.types import Message, RawMessageStreamEvent
from pydantic import TypeAdapter
from support.api_fixtures import slots_backend
from support.openai_schemas import check_response_event, check_responses

SCHEMA = {
    "type": "object",
    "properties": {"word": {"type": "string", "maxLength": 5}},
    "required": ["word"],
    "additionalProperties": False,
}
RESPONSES_TOOL = {"type": "function", "name": "lookup", "parameters": SCHEMA}
MESSAGES_TOOL = {"name": "lookup", "description": "look a word up", "input_schema": SCHEMA}
EVENT = TypeAdapter(RawMessageStreamEvent)


@pytest.fixture
def proxy(chat_worker, make_proxy):
    return make_proxy(slots_backend(chat_worker))


def test_a_responses_chain_calls_a_function_and_takes_its_output(proxy):
    http = proxy.http()
    body = {"model": "tiny", "input": "look up hello", "tools": [RESPONSES_TOOL],
            "tool_choice": "required", "parallel_tool_calls": False,
            "max_output_tokens": 200, "temperature": 0}  # fmt: skip
    first = http.post("/v1/responses", json=body).json()
    check_responses("Response", first)
    (call,) = [item for item in first["output"] if item["type"] == "function_call"]
    assert call["name"] == "lookup" and len(json.loads(call["arguments"])["word"]) <= 5
    result = {"model": "tiny", "previous_response_id": first["id"], "tools": [RESPONSES_TOOL],
              "input": [{"type": "function_call_output", "call_id": call["call_id"],
                         "output": "a greeting"}],
              "max_output_tokens": 8, "temperature": 0}  # fmt: skip
    second = http.post("/v1/responses", json=result).json()
    check_responses("Response", second)
    assert (
        second["usage"]["input_tokens_details"]["cached_tokens"] >= first["usage"]["input_tokens"]
    )
    history = http.get(f"/v1/sessions/{first['id']}").json()["messages"]
    assert [m["role"] for m in history] == ["user", "assistant", "tool", "assistant"]
    assert history[1]["tool_calls"][0]["id"] == call["call_id"]
    assert history[2] == {"role": "tool", "content": "a greeting",
                          "tool_call_id": call["call_id"]}  # fmt: skip
    items = http.get(f"/v1/responses/{second['id']}/input_items").json()
    assert items["data"][0]["type"] == "function_call_output"


def test_a_streamed_function_call_is_openais_events(proxy):
    body = {"model": "tiny", "input": "look up hello", "tools": [RESPONSES_TOOL],
            "tool_choice": {"type": "function", "name": "lookup"}, "stream": True,
            "parallel_tool_calls": False,
            "max_output_tokens": 200, "temperature": 0}  # fmt: skip
    with proxy.http().stream("POST", "/v1/responses", json=body) as reply:
        events = [json.loads(line[6:]) for line in reply.iter_lines() if line.startswith("data: ")]
    for event in events:
        check_response_event(event)
    kinds = [e["type"] for e in events]
    assert "response.function_call_arguments.delta" in kinds
    assert kinds[-3:] == ["response.function_call_arguments.done", "response.output_item.done",
                          "response.completed"]  # fmt: skip
    deltas = "".join(
        e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta"
    )
    final = events[-1]["response"]
    call = next(item for item in final["output"] if item["type"] == "function_call")
    assert call["arguments"] == deltas and json.loads(deltas)["word"] is not None


def test_messages_tool_use_and_tool_result_in_a_session(proxy):
    client = anthropic.Anthropic(base_url=proxy.url, api_key="none", max_retries=0,
                                 default_headers={"X-Session-Id": "claude-tools"})  # fmt: skip
    history = [{"role": "user", "content": "look up hello"}]
    first = client.messages.create(
        model="tiny",
        max_tokens=200,
        messages=history,
        tools=[MESSAGES_TOOL],
        tool_choice={"type": "tool", "name": "lookup", "disable_parallel_tool_use": True},
    )
    Message.model_validate(first.model_dump())
    (use,) = [b for b in first.content if b.type == "tool_use"]
    assert first.stop_reason == "tool_use" and use.name == "lookup" and "word" in use.input
    history += [
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                      "content": "a greeting"}]},
    ]  # fmt: skip
    second = client.messages.create(model="tiny", max_tokens=8, messages=history,
                                    tools=[MESSAGES_TOOL])  # fmt: skip
    assert second.usage.cache_read_input_tokens >= first.usage.input_tokens
    stored = proxy.http().get("/v1/sessions/claude-tools").json()["messages"]
    assert [m["role"] for m in stored] == ["user", "assistant", "tool", "assistant"]


def test_a_streamed_tool_use_is_anthropics_events(proxy):
    body = {"model": "tiny", "max_tokens": 200, "temperature": 0, "stream": True,
            "messages": [{"role": "user", "content": "look up hello"}],
            "tools": [MESSAGES_TOOL],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": True}}  # fmt: skip
    with proxy.http().stream("POST", "/v1/messages", json=body) as reply:
        events = [json.loads(line[6:]) for line in reply.iter_lines() if line.startswith("data: ")]
    for event in events:
        if event["type"] != "ping":
            EVENT.validate_python(event)
    starts = [e["content_block"] for e in events if e["type"] == "content_block_start"]
    assert starts[-1]["type"] == "tool_use" and starts[-1]["name"] == "lookup"
    partial = "".join(e["delta"]["partial_json"] for e in events
                      if e["type"] == "content_block_delta"
                      and e["delta"]["type"] == "input_json_delta")  # fmt: skip
    assert "word" in json.loads(partial)
    assert events[-2]["delta"]["stop_reason"] == "tool_use"
    client = anthropic.Anthropic(base_url=proxy.url, api_key="none", max_retries=0)
    fields = {k: v for k, v in body.items() if k not in ("stream", "temperature")}
    with client.messages.stream(**fields) as stream:
        final = stream.get_final_message()
    assert final.content[-1].type == "tool_use" and "word" in final.content[-1].input
