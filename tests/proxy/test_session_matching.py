"""Sessions that never duplicate, never resurrect and lose nothing: a resent history is
matched by longest common prefix, an edit rewinds, a retry gets the stored reply, DELETE
during a turn wins, tool calls are kept, and counting a prompt costs one call to the backend.
Every test runs twice: sessions in SQLite, and in a real PostgreSQL."""

from __future__ import annotations

import threading

import openai
import pytest
from support.backend_fixtures import MODEL, NO_EOS
from support.openai_schemas import check_chat, check_chunk, sse_events

pytestmark = pytest.mark.timeout(180)

CHAT = "/v1/chat/completions"
TOOL = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer"}},
                       "required": ["a"]},
    },
}  # fmt: skip


@pytest.fixture
def make_proxy(make_proxy, store_target):
    """The shared fixture's proxies, keeping sessions in this run's store (both kinds)."""
    return lambda backend=None, **proxy: make_proxy(backend, sessions_db=store_target, **proxy)


def sid(name: str) -> dict:
    return {"extra_headers": {"X-Session-Id": name}}


def converse(client, session: str, turns: int, reshape=lambda text: text) -> list[dict]:
    """`turns` turns, each resending the whole conversation (replies passed via `reshape`)."""
    history: list[dict] = []
    for turn in range(turns):
        history.append({"role": "user", "content": f"what time {turn}"})
        reply = client.chat.completions.create(
            model=MODEL, messages=history, max_tokens=4, seed=turn, **sid(session)
        )
        history.append({"role": "assistant", "content": reshape(reply.choices[0].message.content)})
    return history


def test_resent_history_with_trimmed_replies_is_not_stored_again(make_proxy) -> None:
    proxy = make_proxy()
    # a UI trims each reply, then pads it differently
    history = converse(proxy.client(), "trim", 6, lambda text: "  " + text.strip() + "\n")
    stored = proxy.http().get("/v1/sessions/trim").json()
    assert stored["turns"] == 6 and len(stored["messages"]) == 12
    # what the session holds is what the client holds (replies as the backend sent them)
    assert [m["role"] for m in stored["messages"]] == [m["role"] for m in history]
    assert [m["content"].strip() for m in stored["messages"]] == [
        m["content"].strip() for m in history
    ]
    assert stored["messages"][1]["content"] != history[1]["content"]  # not byte for byte


def test_an_edited_earlier_message_rewinds_the_session(make_proxy) -> None:
    proxy = make_proxy()
    client = proxy.client()
    history = converse(client, "edit", 3)
    edited = [history[0], history[1], {"role": "user", "content": "something else"}]
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=edited, max_tokens=3, **sid("edit")
    )
    assert raw.headers["X-Llmup-Session-Rewound"] == "2"  # turns 2 and 3 replaced
    stored = proxy.http().get("/v1/sessions/edit").json()
    users = [m["content"] for m in stored["messages"] if m["role"] == "user"]
    assert stored["turns"] == 2 and users == ["what time 0", "something else"]
    # sending only the next message still appends (nothing rewound)
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "what time 0"}], max_tokens=3,
        **sid("edit"),
    )  # fmt: skip
    assert "X-Llmup-Session-Rewound" not in raw.headers
    assert proxy.http().get("/v1/sessions/edit").json()["turns"] == 3


def test_an_exact_retry_gets_the_stored_reply(make_proxy) -> None:
    proxy = make_proxy()
    http = proxy.http()
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
            "temperature": 1.5, "logit_bias": NO_EOS}  # fmt: skip
    headers = {"X-Session-Id": "retry"}
    retry = {**headers, "x-stainless-retry-count": "1"}  # what the openai SDKs send on a retry
    first = http.post(CHAT, json=body, headers=headers)
    again = http.post(CHAT, json=body, headers=retry)  # the reply was "lost": sent again
    assert again.json() == first.json() and again.headers["X-Llmup-Session-Replayed"] == "1"
    check_chat(again.json())
    assert http.get("/v1/sessions/retry").json()["turns"] == 1
    # the whole conversation resent exactly as before is a retry without any header
    whole = {**body, "messages": [*body["messages"], first.json()["choices"][0]["message"],
                                  {"role": "user", "content": "more"}]}  # fmt: skip
    second = http.post(CHAT, json=whole, headers=headers).json()
    assert http.post(CHAT, json=whole, headers=headers).json() == second
    assert http.get("/v1/sessions/retry").json()["turns"] == 2
    # a streamed turn, retried streamed: the same text again, as OpenAI chunks
    stream = {**body, "messages": [{"role": "user", "content": "again"}], "stream": True,
              "stream_options": {"include_usage": True}}  # fmt: skip
    original = sse_events(http.post(CHAT, json=stream, headers=headers).text)
    replayed = sse_events(http.post(CHAT, json=stream, headers=retry).text)
    for chunk in replayed[:-1]:
        check_chunk(chunk)

    def text(events: list) -> str:
        return "".join(
            c["choices"][0]["delta"].get("content") or "" for c in events[:-1] if c["choices"]
        )

    assert text(replayed) == text(original) and replayed[-2]["usage"] == original[-2]["usage"]
    assert http.get("/v1/sessions/retry").json()["turns"] == 3
    # the same single message sent again, not as a retry ("hello", twice), is a new turn
    repeated = http.post(CHAT, json={**stream, "stream": False}, headers=headers)
    assert "X-Llmup-Session-Replayed" not in repeated.headers
    repeated = http.post(CHAT, json={**stream, "stream": False}, headers=headers)
    assert "X-Llmup-Session-Replayed" not in repeated.headers
    assert http.get("/v1/sessions/retry").json()["turns"] == 5


def test_delete_during_a_turn_is_never_undone(make_proxy) -> None:
    proxy = make_proxy()
    client, http = proxy.client(), proxy.http()
    client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "first"}], max_tokens=2, **sid("d")
    )
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "second"}], max_tokens=60,
        logit_bias=NO_EOS, stream=True, **sid("d"),
    )  # fmt: skip
    chunks = iter(stream)
    next(chunks)
    assert http.delete("/v1/sessions/d").status_code == 200
    assert list(chunks)[-1].choices[0].finish_reason == "length"  # the reply still arrives
    assert http.get("/v1/sessions/d").status_code == 404  # and the session stays deleted
    client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "third"}], max_tokens=2, **sid("d")
    )
    users = [m["content"] for m in http.get("/v1/sessions/d").json()["messages"]
             if m["role"] == "user"]  # fmt: skip
    assert users == ["third"]


def test_tool_calls_and_tool_results_are_stored_and_replayed(make_proxy) -> None:
    proxy = make_proxy()
    client = proxy.client()
    first = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "add one"}], max_tokens=12,
        tools=[TOOL], tool_choice={"type": "function", "function": {"name": "add"}},
        **sid("tools"),
    )  # fmt: skip
    calls = first.choices[0].message.tool_calls
    assert calls and calls[0].function.name == "add"
    stored = proxy.http().get("/v1/sessions/tools").json()["messages"]
    assert stored[1]["tool_calls"][0]["id"] == calls[0].id
    assert stored[1]["tool_calls"][0]["function"]["arguments"] == calls[0].function.arguments
    result = {"role": "tool", "tool_call_id": calls[0].id, "content": "2"}
    second = client.chat.completions.create(
        model=MODEL, messages=[result], max_tokens=3, **sid("tools")
    )
    assert second.usage.prompt_tokens > first.usage.prompt_tokens
    stored = proxy.http().get("/v1/sessions/tools").json()["messages"]
    assert [m["role"] for m in stored] == ["user", "assistant", "tool", "assistant"]
    assert stored[2] == result
    # the whole conversation resent (tool calls included) matches: nothing stored twice
    resent = [
        {"role": "user", "content": "add one"},
        first.choices[0].message.model_dump(exclude_none=True),
        result,
        {"role": "assistant", "content": second.choices[0].message.content},
        {"role": "user", "content": "thanks"},
    ]
    client.chat.completions.create(model=MODEL, messages=resent, max_tokens=2, **sid("tools"))
    assert len(proxy.http().get("/v1/sessions/tools").json()["messages"]) == 6


def test_message_caps_and_one_count_per_request(make_proxy, tiny_backend) -> None:
    """The backend counts each request's prompt once (the whole rendered prompt, however
    many messages); nothing is counted message by message."""
    proxy = make_proxy(max_request_messages=400, max_session_messages=6)
    http = proxy.http()

    def tokenize_calls() -> int:
        log = tiny_backend.log_path.read_text()
        return log.count("/llmup/prompt-tokens") + log.count("/extras/tokenize")

    many = [{"role": "user", "content": f"m{i}"} for i in range(401)]
    response = http.post(CHAT, json={"model": MODEL, "messages": many})
    assert response.status_code == 400 and response.json()["error"]["code"] == "too_many_messages"
    before = tokenize_calls()
    response = http.post(CHAT, json={"model": MODEL, "messages": many[:300], "max_tokens": 2})
    assert response.json()["error"]["code"] == "context_length_exceeded"
    assert tokenize_calls() - before == 1  # 300 messages, one call
    for turn in range(3):
        before = tokenize_calls()
        body = {"model": MODEL, "messages": [{"role": "user", "content": f"turn {turn}"}],
                "max_tokens": 2}  # fmt: skip
        response = http.post(CHAT, json=body, headers={"X-Session-Id": "capped"})
        assert response.status_code == 200, response.text
        assert tokenize_calls() - before == 1  # one count of the prompt, history and all
    response = http.post(CHAT, json=body | {"messages": [{"role": "user", "content": "4"}]},
                         headers={"X-Session-Id": "capped"})  # fmt: skip
    assert response.status_code == 400 and response.json()["error"]["code"] == "session_too_long"
    assert http.get("/v1/sessions/capped").json()["turns"] == 3


def test_concurrent_delete_and_turn_race_leaves_no_partial_session(make_proxy) -> None:
    proxy = make_proxy()
    client, http = proxy.client(), proxy.http()
    errors: list[Exception] = []

    def turn(i: int) -> None:
        try:
            client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": f"t{i}"}], max_tokens=2,
                **sid("race"),
            )  # fmt: skip
        except openai.APIError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=turn, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    http.delete("/v1/sessions/race")
    for t in threads:
        t.join()
    assert not errors
    stored = http.get("/v1/sessions/race")
    if stored.status_code == 200:  # whatever survived is whole turns, in order
        roles = [m["role"] for m in stored.json()["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2)
