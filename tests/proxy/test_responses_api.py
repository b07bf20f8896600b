"""The Responses API on llmup's slot worker, through the official openai client: a chain of
`previous_response_id`s is one session whose KV cache is reused, an older id branches
without touching the original, stored responses are read, listed and deleted, `store: false`
keeps nothing, another key finds nothing, bad input is a 400 that changes nothing, and every
reply and stream event is valid against OpenAI's published schemas."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from support.openai_schemas import check_error, check_response_event, check_responses

from launcher.proxy.responses.models import CreateResponse
from launcher.proxy.responses.objects import ResponseBuilder, ResponseHead


@pytest.fixture(scope="module")
def proxy(slot_proxy):
    return slot_proxy


def create(client: openai.OpenAI, text: str | list, **fields) -> dict:
    """A response made with the openai SDK (which parses it), as the server sent it (checked
    against OpenAI's schema)."""
    raw = client.responses.with_raw_response.create(
        model="tiny", input=text, max_output_tokens=6, temperature=0, **fields
    )
    body = raw.http_response.json()
    check_responses("Response", body)
    assert raw.parse().id == body["id"]
    return body


def session(proxy, key: str, session_id: str) -> dict:
    return proxy.http(key).get(f"/v1/sessions/{session_id}").json()


def test_a_chain_is_one_session_and_reuses_its_kv(proxy) -> None:
    client = proxy.client("key-a")
    first = create(client, "hello world the time", instructions="be brief")
    assert first["id"].startswith("resp_r1_") and first["status"] in ("completed", "incomplete")
    assert first["output"][0]["type"] == "message" and first["usage"]["input_tokens"] > 0
    second = create(client, "what some thing", previous_response_id=first["id"])
    cached = second["usage"]["input_tokens_details"]["cached_tokens"]
    assert cached >= first["usage"]["input_tokens"]  # the chain did not re-read its history
    chain = session(proxy, "key-a", first["id"])  # the chain's session: its first id
    assert chain["turns"] == 2 and chain["messages"][0] == {"role": "system", "content": "be brief"}
    assert [m["role"] for m in chain["messages"][1:]] == ["user", "assistant"] * 2
    assert chain["messages"][3]["content"] == "what some thing"
    stored = client.responses.with_raw_response.retrieve(second["id"]).http_response.json()
    assert stored == second
    items = proxy.http("key-a").get(f"/v1/responses/{second['id']}/input_items").json()
    check_responses("ResponseItemList", items)
    assert [i["content"][0]["text"] for i in items["data"]] == ["what some thing"]
    # the chain's session is a session like any other: chat continues it
    reply = proxy.http("key-a").post(
        "/v1/chat/completions",
        json={
            "model": "tiny",
            "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 4,
        },  # fmt: skip
        headers={"X-Session-Id": first["id"]},
    )
    assert reply.status_code == 200, reply.text
    assert session(proxy, "key-a", first["id"])["turns"] == 3


def test_an_older_id_branches_and_the_original_is_untouched(proxy) -> None:
    client = proxy.client("key-a")
    first = create(client, "hello world")
    second = create(client, "the time", previous_response_id=first["id"])
    before = session(proxy, "key-a", first["id"])
    branch = create(client, "some thing", previous_response_id=first["id"])
    forked = session(proxy, "key-a", branch["id"])  # a new session, named by the branch
    assert forked["turns"] == 2 and forked["messages"][:2] == before["messages"][:2]
    assert forked["messages"][2]["content"] == "some thing"
    assert session(proxy, "key-a", first["id"]) == before
    # the original chain goes on from its latest response, its KV intact
    third = create(client, "what word", previous_response_id=second["id"])
    assert (
        third["usage"]["input_tokens_details"]["cached_tokens"] >= second["usage"]["input_tokens"]
    )
    assert session(proxy, "key-a", first["id"])["turns"] == 3
    # and the branch continues as a chain of its own
    more = create(client, "more", previous_response_id=branch["id"])
    assert session(proxy, "key-a", branch["id"])["turns"] == 3 and more["id"] != branch["id"]


def test_store_false_keeps_nothing_but_reads_the_chain(proxy) -> None:
    client = proxy.client("key-a")
    first = create(client, "hello world")
    sessions = proxy.http("key-a").get("/v1/sessions").json()["data"]
    loose = create(client, "the time", previous_response_id=first["id"], store=False)
    assert (
        loose["store"] is False and loose["usage"]["input_tokens"] > first["usage"]["input_tokens"]
    )  # the history was sent
    assert proxy.http("key-a").get("/v1/sessions").json()["data"] == sessions
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(loose["id"])
    assert session(proxy, "key-a", first["id"])["turns"] == 1


def test_another_key_finds_none_of_them(proxy) -> None:
    mine = create(proxy.client("key-a"), "hello world")
    other = proxy.http("key-b")
    for method, path in [
        ("GET", f"/v1/responses/{mine['id']}"),
        ("DELETE", f"/v1/responses/{mine['id']}"),
        ("GET", f"/v1/responses/{mine['id']}/input_items"),
    ]:
        reply = other.request(method, path)
        assert reply.status_code == 404 and reply.json()["error"]["code"] == "response_not_found"
        check_error(reply.json())
    with pytest.raises(openai.NotFoundError) as refused:
        create(proxy.client("key-b"), "hi", previous_response_id=mine["id"])
    assert refused.value.body["code"] == "previous_response_not_found"
    assert proxy.http("key-a").get(f"/v1/responses/{mine['id']}").status_code == 200


def test_deleting_the_last_response_deletes_the_chain(proxy) -> None:
    client = proxy.client("key-a")
    first = create(client, "hello world")
    second = create(client, "the time", previous_response_id=first["id"])
    client.responses.delete(second["id"])
    assert session(proxy, "key-a", first["id"])["turns"] == 2  # the chain holds first
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(second["id"])
    client.responses.delete(first["id"])
    assert proxy.http("key-a").get(f"/v1/sessions/{first['id']}").status_code == 404


def test_bad_input_is_a_400_that_stores_nothing(proxy) -> None:
    http = proxy.http("key-a")
    before = http.get("/v1/sessions").json()["data"]
    bad = [
        {"model": "tiny"},  # no input
        {"model": "tiny", "input": [{"role": "user", "content": [{"type": "input_image"}]}]},
        {"model": "tiny", "input": "hi", "previous_response_id": "resp_x", "conversation": "c"},
        {"model": "tiny", "input": "hi", "max_output_tokens": 0},
        {"model": "tiny", "input": "hi", "background": True},
        {"model": "tiny", "input": [{"type": "function_call_output", "output": "x"}]},
    ]
    for body in bad:
        reply = http.post("/v1/responses", json=body)
        assert reply.status_code == 400, (body, reply.text)
        check_error(reply.json())
    missing = http.post("/v1/responses", json={"model": "other", "input": "hi"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    assert http.get("/v1/sessions").json()["data"] == before


def test_a_stream_is_openais_events_in_order(proxy) -> None:
    client = proxy.client("key-a")
    first = create(client, "hello world")
    with proxy.http("key-a").stream(
        "POST", "/v1/responses",
        json={"model": "tiny", "input": "the time", "stream": True, "max_output_tokens": 6,
              "previous_response_id": first["id"]},
    ) as reply:  # fmt: skip
        assert reply.status_code == 200
        lines = [line for line in reply.iter_lines() if line]
    names = [line[7:] for line in lines if line.startswith("event: ")]
    events = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
    assert [e["type"] for e in events] == names
    for event in events:
        check_response_event(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    kinds = [e["type"] for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]  # fmt: skip
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.completed"]  # fmt: skip
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    final = events[-1]["response"]
    assert final["output"][0]["content"][0]["text"] == deltas
    assert final["usage"]["input_tokens_details"]["cached_tokens"] >= first["usage"]["input_tokens"]
    stored = proxy.http("key-a").get(f"/v1/responses/{final['id']}").json()
    assert stored == final
    # the SDK reads the same stream
    with client.responses.stream(model="tiny", input="some", max_output_tokens=4) as stream:
        done = stream.get_final_response()
    assert done.id.startswith("resp_r1_") and done.output_text == done.output[0].content[0].text


def test_input_tokens_counts_the_history(proxy) -> None:
    client = proxy.client("key-a")
    first = create(client, "hello world")
    alone = proxy.http("key-a").post(
        "/v1/responses/input_tokens", json={"model": "tiny", "input": "the time"}
    )
    chained = proxy.http("key-a").post(
        "/v1/responses/input_tokens",
        json={"model": "tiny", "input": "the time", "previous_response_id": first["id"]},
    )
    check_responses("TokenCountsResource", alone.json())
    assert chained.json()["input_tokens"] > alone.json()["input_tokens"] > 0


def test_without_a_key_it_is_refused_before_anything(proxy) -> None:
    reply = httpx.post(proxy.url + "/v1/responses", json={"model": "tiny", "input": "x"})
    assert reply.status_code == 401


def test_metrics_count_each_api_on_its_own(proxy) -> None:
    create(proxy.client("key-a"), "hello world")
    text = proxy.http("key-a").get("/metrics").text
    counted = {
        line.split("{", 1)[1].split("}")[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("llmup_tokens_total{")
    }
    assert counted['api="responses",direction="in"'] > 0
    assert counted['api="responses",direction="out"'] > 0
    assert 'llmup_requests_total{route="/v1/responses",status="200"}' in text


def test_served_without_v1_too(proxy) -> None:
    """Like chat, the Responses and Conversations routes answer at the top level as well,
    for a base URL typed without /v1."""
    client = openai.OpenAI(base_url=proxy.url, api_key="key-a", max_retries=0)
    first = client.responses.create(model="tiny", input="hello", max_output_tokens=3)
    assert client.responses.retrieve(first.id).id == first.id
    conv = client.conversations.create()
    assert client.conversations.retrieve(conv.id).id == conv.id


def test_tools_it_cannot_run_are_left_out_and_items_of_one_role_join(proxy) -> None:
    """What Codex CLI sends: two developer and two user messages, a hosted tool and a tool
    namespace beside nothing else; the reply comes, the session holds one user message."""
    client = proxy.client("key-a")
    reply = create(
        client,
        [{"type": "message", "role": "developer", "content": [{"type": "input_text",
          "text": "be brief"}]},
         {"role": "developer", "content": "use tools"},
         {"role": "user", "content": [{"type": "input_text", "text": "<env>cwd</env>"}]},
         {"role": "user", "content": "say hi"}],
        tools=[{"type": "web_search"},
               {"type": "namespace", "name": "agents", "description": "x", "tools": []}],
    )  # fmt: skip
    assert reply["tools"] == []
    stored = session(proxy, "key-a", reply["id"])["messages"]
    assert stored[:2] == [{"role": "system", "content": "be brief\n\nuse tools"},
                          {"role": "user", "content": "<env>cwd</env>\n\nsay hi"}]  # fmt: skip


def test_a_json_schema_format_constrains_the_reply(proxy) -> None:
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}},
              "required": ["answer"], "additionalProperties": False}  # fmt: skip
    raw = proxy.client("key-a").responses.with_raw_response.create(
        model="tiny", input="is it so?", max_output_tokens=40, temperature=0,
        text={"format": {"type": "json_schema", "name": "verdict", "schema": schema}},
    )  # fmt: skip
    check_responses("Response", raw.http_response.json())  # as sent, not as the SDK dumps it
    reply = raw.parse()
    assert json.loads(reply.output_text)["answer"] in ("yes", "no")
    assert reply.text.format.type == "json_schema" and reply.text.format.name == "verdict"


@pytest.mark.parametrize("choice", ["auto", "none", "required", {"type": "function", "name": "f"}])
def test_the_response_object_echoes_tools_and_tool_choice(choice) -> None:
    request = CreateResponse.model_validate({
        "model": "m", "input": "hi", "tool_choice": choice, "parallel_tool_calls": True,
        "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}},
                  {"type": "web_search"}],
    })  # fmt: skip
    builder = ResponseBuilder(ResponseHead("resp_r1_" + "0" * 48, 1, "m", request))
    reply = {"choices": [{"finish_reason": "tool_calls", "message": {"content": None,
             "tool_calls": [{"id": "call_1", "type": "function",
                             "function": {"name": "f", "arguments": "{}"}}]}}],
             "usage": {"prompt_tokens": 5, "completion_tokens": 2}}  # fmt: skip
    for value in (builder.base("in_progress"), builder.finish(reply)):
        check_responses("Response", value)
    final = builder.finish(reply)
    assert final["tool_choice"] == choice and [t["name"] for t in final["tools"]] == ["f"]
    assert final["output"] == [{"id": builder.call_item_id(0), "type": "function_call",
                                "status": "completed", "call_id": "call_1", "name": "f",
                                "arguments": "{}"}]  # fmt: skip
