"""The proxy in front of llmup's slot worker with tools, prefill and n choices in sessions
(stored, and the KV cache reused through the calls), CORS for browser pages, and OpenAI's
`json_schema` response format on llama-cpp-python's server too."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from support.api_fixtures import slots_backend
from support.backend_fixtures import MODEL
from support.openai_schemas import check_chat, check_chunk
from support.worker_fixtures import CLEAN_WORDS

from launcher.cli.serving import access_settings
from launcher.errors import UsageError
from launcher.settings import Settings

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "parameters": {
                "type": "object",
                "properties": {"word": {"type": "string", "maxLength": 5}},
                "required": ["word"],
                "additionalProperties": False,
            },
        },
    }
]
CALL = {"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False}
APP = "https://app.example.com"


@pytest.fixture
def proxy(chat_worker, make_proxy):
    return make_proxy(slots_backend(chat_worker), cors_origins=[APP])


def session_chat(client, sid: str, messages: list[dict], **fields):
    reply = client.chat.completions.create(
        model="tiny", messages=messages, extra_headers={"X-Session-Id": sid}, **fields
    )
    check_chat(reply.model_dump(mode="json", exclude_unset=True))
    return reply


def stored(proxy, sid: str) -> list[dict]:
    return proxy.http().get(f"/v1/sessions/{sid}").json()["messages"]


def cached(reply) -> int:
    return reply.usage.prompt_tokens_details.cached_tokens


def test_a_tool_turn_is_stored_and_the_next_turn_reuses_its_cache(proxy):
    client = proxy.client()
    ask = {"role": "user", "content": "look up the word hello"}
    first = session_chat(client, "t", [ask], max_tokens=200, temperature=0, **CALL)
    call = first.choices[0].message.tool_calls[0]
    assert first.choices[0].finish_reason == "tool_calls"
    history = stored(proxy, "t")
    assert [m["role"] for m in history] == ["user", "assistant"]
    assert history[1]["tool_calls"][0]["function"] == call.function.model_dump()
    result = {"role": "tool", "tool_call_id": call.id, "content": "a greeting"}
    second = session_chat(
        client, "t", [result], tools=TOOLS, max_tokens=5, extra_body={"logit_bias": CLEAN_WORDS}
    )
    assert second.choices[0].message.content
    # the call came back as the model wrote it: the cache covers the first prompt and more
    assert cached(second) >= first.usage.prompt_tokens
    assert [m["role"] for m in stored(proxy, "t")] == ["user", "assistant", "tool", "assistant"]


def test_a_streamed_call_is_stored_like_a_whole_one(proxy):
    client = proxy.client()
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "look up"}], stream=True,
            max_tokens=200, temperature=0, extra_headers={"X-Session-Id": "s"}, **CALL,
        )
    )  # fmt: skip
    for chunk in chunks:
        check_chunk(chunk.model_dump(mode="json", exclude_unset=True))
    pieces = [c.choices[0].delta.tool_calls[0] for c in chunks if c.choices[0].delta.tool_calls]
    arguments = "".join(p.function.arguments for p in pieces)
    message = stored(proxy, "s")[1]
    assert message["tool_calls"][0]["id"] == pieces[0].id
    assert message["tool_calls"][0]["function"]["arguments"] == arguments
    json.loads(arguments)


def test_a_streamed_function_call_is_stored_too(proxy):
    """The legacy functions API: `function_call` deltas, stored as the message's call."""
    function = TOOLS[0]["function"]
    chunks = list(
        proxy.client().chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "look up"}], stream=True,
            functions=[function], function_call={"name": "lookup"}, max_tokens=200,
            temperature=0, extra_headers={"X-Session-Id": "f"},
        )
    )  # fmt: skip
    pieces = [c.choices[0].delta.function_call for c in chunks if c.choices[0].delta.function_call]
    assert pieces[0].name == "lookup" and chunks[-1].choices[0].finish_reason == "function_call"
    stored_call = stored(proxy, "f")[1]["function_call"]
    assert stored_call == {"name": "lookup", "arguments": "".join(p.arguments for p in pieces)}


def test_a_continued_reply_is_stored_as_one_message(proxy):
    client = proxy.client()
    words = {"logit_bias": CLEAN_WORDS}
    prefill = [{"role": "user", "content": "say hello"}, {"role": "assistant", "content": "hello"}]
    reply = session_chat(client, "p", prefill, max_tokens=4, extra_body=words)
    history = stored(proxy, "p")
    assert [m["role"] for m in history] == ["user", "assistant"]
    assert history[1]["content"] == "hello" + reply.choices[0].message.content
    more = session_chat(client, "p", [{"role": "user", "content": "again"}], max_tokens=3,
                        extra_body=words)  # fmt: skip
    assert cached(more) > 0 and len(stored(proxy, "p")) == 4


def test_n_choices_in_a_session_store_the_first(proxy):
    client = proxy.client()
    reply = session_chat(client, "n", [{"role": "user", "content": "hi"}], n=2, max_tokens=4,
                         seed=3, extra_body={"logit_bias": CLEAN_WORDS})  # fmt: skip
    assert [c.index for c in reply.choices] == [0, 1]
    assert stored(proxy, "n")[1]["content"] == reply.choices[0].message.content


def test_a_listed_origin_may_call_from_a_browser(proxy):
    http = httpx.Client(base_url=proxy.url, timeout=60, trust_env=False)
    preflight = {
        "Origin": APP,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, x-session-id",
    }
    allowed = http.options("/v1/chat/completions", headers=preflight)
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == APP
    granted = allowed.headers["access-control-allow-headers"].lower()
    assert all(h in granted for h in ("authorization", "x-session-id", "idempotency-key"))
    other = http.options("/v1/chat/completions", headers={**preflight, "Origin": "https://x.io"})
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True},
                     headers={"Origin": APP, "X-Session-Id": "c"}) as streamed:  # fmt: skip
        assert streamed.status_code == 200
        assert streamed.headers["access-control-allow-origin"] == APP
        exposed = streamed.headers["access-control-expose-headers"].lower()
        assert "x-llmup-context-dropped" in exposed
        assert streamed.read().endswith(b"data: [DONE]\n\n")


def test_without_origins_there_is_no_cors(make_proxy, chat_worker):
    proxy = make_proxy(slots_backend(chat_worker))
    preflight = {"Origin": APP, "Access-Control-Request-Method": "POST"}
    reply = proxy.http().options("/v1/chat/completions", headers=preflight)
    assert reply.status_code == 405 and "access-control-allow-origin" not in reply.headers


def test_origins_come_from_settings_and_flags_and_are_checked(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMUP_PROXY__CORS_ORIGINS", "https://A.example.com/, http://localhost:3000")
    settings = Settings(home=tmp_path)
    assert settings.proxy.cors_origins == ["https://a.example.com", "http://localhost:3000"]
    flagged = access_settings(settings, api_key_file=None, allowed_hosts=None, cors_origins=[APP])
    assert flagged.proxy.cors_origins[-1] == APP
    assert settings.proxy.cors_origins[-1] != APP  # a copy: the tree it started from is kept
    with pytest.raises(UsageError, match="not a web origin"):
        access_settings(settings, api_key_file=None, allowed_hosts=None, cors_origins=["a.com/x"])


def test_json_schema_reaches_llama_cpp_server_as_its_own_schema(make_proxy):
    client = make_proxy().client()  # llama-cpp-python's server (`--llamacpp-impl server`)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=40,
        response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": schema}},
    )  # fmt: skip
    assert isinstance(json.loads(reply.choices[0].message.content)["ok"], bool)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], n=2, max_tokens=2
        )
    assert "leave out `--llamacpp-impl server`" in caught.value.body["message"]
    with pytest.raises(openai.BadRequestError) as caught:  # llama_cpp.server would ignore it
        client.completions.create(
            model=MODEL, prompt="hi", max_tokens=2,
            extra_body={"response_format": {"type": "json_object"}},
        )  # fmt: skip
    assert caught.value.body["param"] == "response_format"
