"""The Conversations API through the official openai client: a conversation is a session
(listed with the sessions, continued by chat with X-Session-Id and by `conversation` on a
response), its items are its messages with stable ids, another key finds nothing, and every
reply is valid against OpenAI's published schemas."""

from __future__ import annotations

import openai
import pytest
from support.openai_schemas import check_error, check_responses


@pytest.fixture(scope="module")
def proxy(slot_proxy):
    return slot_proxy


def dump(value) -> dict:
    return value.model_dump(mode="json", exclude_unset=True)


def test_a_conversation_is_a_session_every_api_continues(proxy) -> None:
    client = proxy.client("key-a")
    conv = client.conversations.create(
        items=[{"type": "message", "role": "user", "content": "hello world"}],
        metadata={"topic": "demo"},
    )
    check_responses("ConversationResource", dump(conv))
    assert conv.id.startswith("conv_r1_") and conv.metadata == {"topic": "demo"}
    listed = proxy.http("key-a").get("/v1/sessions").json()["data"]
    assert conv.id in [s["id"] for s in listed]  # a session, in the web page's list too
    # a response in the conversation is its next turn
    reply = client.responses.create(model="tiny", input="the time", conversation=conv.id,
                                    max_output_tokens=5)  # fmt: skip
    check_responses("Response", dump(reply))
    assert reply.conversation.id == conv.id
    items = proxy.http("key-a").get(f"/v1/conversations/{conv.id}/items?order=asc").json()
    check_responses("ConversationItemList", items)
    assert [(i["type"], i["role"]) for i in items["data"]] == [
        ("message", "user"), ("message", "user"), ("message", "assistant")]  # fmt: skip
    assert items["data"][2]["content"][0]["text"] == reply.output_text
    # chat continues the same session
    chat = proxy.http("key-a").post(
        "/v1/chat/completions",
        json={
            "model": "tiny",
            "messages": [{"role": "user", "content": "what"}],
            "max_tokens": 3,
        },  # fmt: skip
        headers={"X-Session-Id": conv.id},
    )
    assert chat.status_code == 200, chat.text
    again = client.conversations.items.list(conv.id, order="asc")
    assert len(again.data) == 5 and again.data[0].id == items["data"][0]["id"]  # stable ids
    one = client.conversations.items.retrieve(again.data[1].id, conversation_id=conv.id)
    assert one.id == again.data[1].id


def test_items_are_added_updated_and_deleted_with_the_conversation(proxy) -> None:
    client = proxy.client("key-a")
    conv = client.conversations.create()
    assert proxy.http("key-a").get(f"/v1/sessions/{conv.id}").json()["turns"] == 0
    added = client.conversations.items.create(
        conv.id,
        items=[
            {"type": "message", "role": "user", "content": "call it"},
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "42"},
        ],
    )
    check_responses("ConversationItemList", dump(added))
    assert [i.type for i in added.data] == ["message", "function_call", "function_call_output"]
    stored = proxy.http("key-a").get(f"/v1/sessions/{conv.id}").json()["messages"]
    assert stored[1]["tool_calls"][0]["function"] == {"name": "f", "arguments": "{}"}
    assert stored[2] == {"role": "tool", "content": "42", "tool_call_id": "c1"}
    updated = client.conversations.update(conv.id, metadata={"k": "v"})
    assert updated.metadata == {"k": "v"} and client.conversations.retrieve(conv.id).metadata == {
        "k": "v"
    }
    deleted = client.conversations.delete(conv.id)
    assert deleted.deleted is True and deleted.id == conv.id
    check_responses("DeletedConversationResource", dump(deleted))
    with pytest.raises(openai.NotFoundError):
        client.conversations.retrieve(conv.id)
    assert proxy.http("key-a").get(f"/v1/sessions/{conv.id}").status_code == 404


def test_another_key_finds_nothing_and_bad_input_changes_nothing(proxy) -> None:
    conv = proxy.client("key-a").conversations.create(
        items=[{"type": "message", "role": "user", "content": "mine"}]
    )
    other = proxy.http("key-b")
    for method, path, body in [
        ("GET", f"/v1/conversations/{conv.id}", None),
        ("POST", f"/v1/conversations/{conv.id}", {"metadata": {}}),
        ("DELETE", f"/v1/conversations/{conv.id}", None),
        ("GET", f"/v1/conversations/{conv.id}/items", None),
        ("POST", f"/v1/conversations/{conv.id}/items",
         {"items": [{"role": "user", "content": "x"}]}),
        ("POST", "/v1/responses", {"model": "tiny", "input": "x", "conversation": conv.id}),
    ]:  # fmt: skip
        reply = other.request(method, path, json=body)
        assert reply.status_code == 404, (path, reply.text)
        check_error(reply.json())
    http = proxy.http("key-a")
    for body in [{"items": []}, {"items": [{"type": "message", "role": "robot"}]}, {}]:
        assert http.post(f"/v1/conversations/{conv.id}/items", json=body).status_code == 400
    assert http.post("/v1/conversations", json={"items": [{"type": "x"}]}).status_code == 400
    assert http.get(f"/v1/sessions/{conv.id}").json()["turns"] == 1
