"""The proxy with the official openai client, in front of a real llama_cpp.server."""

from __future__ import annotations

import asyncio
import time

import openai
import pytest
from support.backend_fixtures import MODEL, N_CTX, NO_EOS, long_text

from launcher.proxy import StaticBackend

pytestmark = pytest.mark.timeout(120)


def session(sid: str) -> dict:
    return {"extra_headers": {"X-Session-Id": sid}}


def test_models_chat_stream_and_completions(make_proxy) -> None:
    client = make_proxy().client()
    assert [m.id for m in client.models.list().data] == [MODEL]

    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=5, seed=1
    )
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    # llama.cpp may count one token more than max_tokens when it holds back a partial UTF-8
    assert chat.usage.completion_tokens <= 6 and chat.usage.prompt_tokens > 0

    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=6,
            stream=True, logit_bias=NO_EOS, temperature=0.5, top_p=0.9,
        )
    )  # fmt: skip
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(texts) >= 3  # streamed piece by piece, not in one buffered block
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks)  # usage only when asked for

    completion = client.completions.create(model=MODEL, prompt="hello world", max_tokens=4)
    assert completion.object == "text_completion" and completion.usage.prompt_tokens == 3


def test_stream_usage_and_stop(make_proxy) -> None:
    client = make_proxy().client()
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5,
            stream=True, stream_options={"include_usage": True}, logit_bias=NO_EOS,
        )
    )  # fmt: skip
    # llama_cpp.server sends no usage in streams: the proxy adds an estimated usage chunk
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and 0 < usage.completion_tokens <= 5
    assert usage.prompt_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    streamed = list(
        client.completions.create(
            model=MODEL, prompt="hello", max_tokens=5, stream=True,
            stream_options={"include_usage": True}, logit_bias=NO_EOS,
        )
    )  # fmt: skip
    assert 0 < streamed[-1].usage.completion_tokens <= 5 and streamed[-1].usage.prompt_tokens == 2
    # response_format and stop pass through to the backend (json grammar, stop strings)
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=8,
        response_format={"type": "json_object"}, stop=["\n"],
    )  # fmt: skip
    assert "\n" not in (reply.choices[0].message.content or "")


def test_embeddings_health_and_metrics(make_proxy, tiny_backend) -> None:
    proxy = make_proxy()
    vectors = proxy.client().embeddings.create(model=MODEL, input="hello world").data
    assert len(vectors) == 1
    health = proxy.http().get("/health")
    assert health.status_code == 200 and health.json()["model"] == MODEL
    assert health.json()["context"] == N_CTX
    assert proxy.metric("llmup_requests_total") >= 2
    assert proxy.metric("llmup_tokens_total") > 0
    assert proxy.metric("llmup_backend_up") == 1


def test_three_turn_session_sending_only_new_messages(make_proxy) -> None:
    proxy = make_proxy()
    client = proxy.client()
    system = {"role": "system", "content": "you are terse"}
    prompts = []
    for turn in range(3):
        new = [{"role": "user", "content": f"hello world {turn}"}]
        messages = [system, *new] if turn == 0 else new
        reply = client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=4, **session("three")
        )
        prompts.append(reply.usage.prompt_tokens)
    assert prompts[0] < prompts[1] < prompts[2]

    stored = proxy.http().get("/v1/sessions/three").json()
    assert stored["turns"] == 3
    roles = [m["role"] for m in stored["messages"]]
    assert roles == ["system"] + ["user", "assistant"] * 3
    # The backend saw the whole history: the same prompt sent statelessly counts the same.
    replay = stored["messages"][:-1]
    stateless = client.chat.completions.create(model=MODEL, messages=replay, max_tokens=1)
    assert stateless.usage.prompt_tokens == prompts[2]


def test_session_with_full_history_resent_is_not_duplicated(make_proxy) -> None:
    proxy = make_proxy()
    client = proxy.client()
    history: list[dict] = [{"role": "system", "content": "be brief"}]
    for turn in range(3):
        history.append({"role": "user", "content": f"what time {turn}"})
        reply = client.chat.completions.create(
            model=MODEL, messages=history, max_tokens=4, **session("full")
        )
        history.append({"role": "assistant", "content": reply.choices[0].message.content})
    stored = proxy.http().get("/v1/sessions/full").json()
    assert stored["messages"] == history and stored["turns"] == 3
    # the body field works for clients that cannot set headers, and finds the same session
    client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "more"}], max_tokens=2,
        extra_body={"session_id": "full"},
    )  # fmt: skip
    assert proxy.http().get("/v1/sessions/full").json()["turns"] == 4


def _fill(client: openai.OpenAI, sid: str, turns: int) -> list:
    replies = []
    for turn in range(turns):
        content = long_text(110, tag=f"turn{turn}")
        replies.append(
            client.chat.completions.with_raw_response.create(
                model=MODEL,
                messages=[{"role": "user", "content": content}],
                max_tokens=8,
                **session(sid),
            )  # fmt: skip
        )
    return replies


def test_overflow_drops_oldest_turns_and_says_so(make_proxy) -> None:
    proxy = make_proxy()
    replies = _fill(proxy.client(), "long", turns=6)
    dropped = [int(r.headers["X-Llmup-Context-Dropped"]) for r in replies]
    assert dropped[0] == 0 and dropped[-1] > 0 and dropped == sorted(dropped)
    assert all(r.parse().usage.prompt_tokens <= N_CTX - 8 for r in replies)
    stored = proxy.http().get("/v1/sessions/long").json()
    assert stored["turns"] == 6  # dropped from the prompt, never from the session
    assert proxy.metric("llmup_context_dropped_turns_total") == sum(dropped)


def test_overflow_with_error_policy(make_proxy) -> None:
    proxy = make_proxy(context_policy="error")
    client = proxy.client()
    with pytest.raises(openai.BadRequestError) as caught:
        _fill(client, "strict", turns=6)
    assert caught.value.code == "context_length_exceeded"
    turns = proxy.http().get("/v1/sessions/strict").json()["turns"]
    assert 1 <= turns < 6
    with pytest.raises(openai.BadRequestError):  # still too long: the session did not grow
        _fill(client, "strict", turns=1)
    assert proxy.http().get("/v1/sessions/strict").json()["turns"] == turns


def test_two_keys_cannot_see_each_others_sessions(make_proxy) -> None:
    proxy = make_proxy(api_keys=["key-a", "key-b"])
    a, b = proxy.client("key-a"), proxy.client("key-b")
    a.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "secret of a"}], max_tokens=2,
        **session("shared"),
    )  # fmt: skip
    assert proxy.http("key-b").get("/v1/sessions").json()["data"] == []
    assert proxy.http("key-b").get("/v1/sessions/shared").status_code == 404
    assert proxy.http("key-b").delete("/v1/sessions/shared").status_code == 404
    b.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "b speaks"}], max_tokens=2,
        **session("shared"),
    )  # fmt: skip
    seen_by_b = proxy.http("key-b").get("/v1/sessions/shared").json()["messages"]
    seen_by_a = proxy.http("key-a").get("/v1/sessions/shared").json()["messages"]
    assert seen_by_b[0]["content"] == "b speaks" and len(seen_by_b) == 2
    assert seen_by_a[0]["content"] == "secret of a" and len(seen_by_a) == 2
    with pytest.raises(openai.AuthenticationError):
        proxy.client("key-c").models.list()
    assert proxy.http().get("/v1/models").status_code == 401
    assert proxy.http("key-a").delete("/v1/sessions/shared").json()["deleted"] is True
    assert proxy.http("key-a").get("/v1/sessions/shared").status_code == 404


def test_bad_requests_are_4xx_with_openai_errors(make_proxy) -> None:
    proxy = make_proxy(max_body_bytes=64 * 1024)
    http = proxy.http()
    chat = "/v1/chat/completions"
    ok = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    cases = [
        (http.post(chat, content=b"{not json", headers={"content-type": "application/json"}), 400),
        (http.post(chat, json={**ok, "messages": "hi"}), 400),
        (http.post(chat, json={**ok, "max_tokens": "many"}), 400),
        (http.post(chat, json={**ok, "temperature": 7}), 400),
        (http.post(chat, json={**ok, "messages": []}), 400),
        (http.post(chat, json=[1, 2]), 400),
        (http.post(chat, json={**ok, "model": "gpt-4"}), 404),
        (http.post(chat, json=ok, headers={"X-Session-Id": "bad id!"}), 400),
        (http.post(chat, json={**ok, "n": 2}, headers={"X-Session-Id": "n2"}), 400),
        (http.post(chat, json={**ok, "max_tokens": N_CTX}, headers={"X-Session-Id": "m"}), 400),
        (
            http.post(
                chat,
                json={**ok, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            ),
            400,
        ),  # noqa: E501
        (http.post(chat, json={**ok, "x": "y" * 100_000}), 413),
        (http.post(chat, content=iter([b"{" + b" " * 70_000])), 413),  # chunked, no length
        (http.post("/v1/completions", json={"model": MODEL}), 400),
        (http.get("/v1/nowhere"), 404),
        (http.put("/v1/models"), 405),
    ]
    for response, status in cases:
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert cases[6][0].json()["error"]["code"] == "model_not_found"
    # a repeated message with nothing new is refused, not stored twice
    http.post(chat, json=ok, headers={"X-Session-Id": "again"})
    again = http.post(chat, json={**ok, "messages": ok["messages"] + [{"role": "assistant",
        "content": http.get("/v1/sessions/again").json()["messages"][1]["content"]}]},
        headers={"X-Session-Id": "again"})  # fmt: skip
    assert again.status_code == 400


def test_full_queue_answers_429_and_disconnect_cancels_backend(make_proxy, tiny_backend) -> None:
    proxy = make_proxy(max_inflight=1, queue_size=0, retry_after_s=3)
    client = proxy.client()
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "go"}], max_tokens=460,
        stream=True, logit_bias=NO_EOS,
    )  # fmt: skip
    next(iter(stream))
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "me too"}], max_tokens=2
        )
    assert caught.value.response.headers["Retry-After"] == "3"
    assert proxy.metric("llmup_queue_rejections_total") == 1
    before = tiny_backend.log_path.read_text().count("Disconnected from client")
    stream.close()
    deadline = time.monotonic() + 10
    while tiny_backend.log_path.read_text().count("Disconnected from client") == before:
        assert time.monotonic() < deadline, "the backend kept generating for a gone client"
        time.sleep(0.05)
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "me too"}], max_tokens=2
    )
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_backend_not_ready_is_503(make_proxy, tmp_path) -> None:
    backend = StaticBackend("http://127.0.0.1:9", MODEL, N_CTX, state="starting")
    proxy = make_proxy(backend=backend)
    with pytest.raises(openai.APIStatusError) as caught:
        proxy.client().chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}]
        )
    assert caught.value.status_code == 503 and caught.value.response.headers["Retry-After"]
    health = proxy.http().get("/health")
    assert health.status_code == 503 and health.json()["backend"]["state"] == "starting"
    backend.state = "ready"  # but nothing listens there: unreachable is a 503 too
    response = proxy.http().post("/v1/completions", json={"model": MODEL, "prompt": "x"})
    assert response.status_code == 503 and response.json()["error"]["code"] == "backend_unavailable"


async def _converse(client: openai.AsyncOpenAI, index: int, turns: int) -> list[int]:
    prompts = []
    for turn in range(turns):
        content = f"session {index} turn {turn} hello"
        kwargs = {"model": MODEL, "messages": [{"role": "user", "content": content}]}
        kwargs |= {"max_tokens": 3, **session(f"c{index}")}
        if index % 2:
            chunks = [c async for c in await client.chat.completions.create(
                **kwargs, stream=True, stream_options={"include_usage": True})]  # fmt: skip
            prompts.append(chunks[-1].usage.prompt_tokens)
        else:
            prompts.append((await client.chat.completions.create(**kwargs)).usage.prompt_tokens)
    return prompts


def test_twenty_concurrent_sessions_lose_and_mix_nothing(make_proxy) -> None:
    proxy = make_proxy()

    async def run() -> list[list[int]]:
        async with proxy.async_client(timeout=60.0) as client:
            return await asyncio.gather(*(_converse(client, i, 5) for i in range(20)))

    started = time.monotonic()
    prompts = asyncio.run(run())
    assert time.monotonic() - started < 60
    for index, grown in enumerate(prompts):
        assert grown == sorted(grown) and grown[0] < grown[-1], (index, grown)
        stored = proxy.http().get(f"/v1/sessions/c{index}").json()["messages"]
        users = [m["content"] for m in stored if m["role"] == "user"]
        assert users == [f"session {index} turn {t} hello" for t in range(5)]
        assert [m["role"] for m in stored] == ["user", "assistant"] * 5
    assert len(proxy.http().get("/v1/sessions").json()["data"]) == 20
    assert proxy.metric("llmup_sessions") == 20


def test_unknown_fields_reach_the_backend(make_proxy) -> None:
    """`grammar` is llama.cpp's own field, not OpenAI's: the proxy passes it on unchanged,
    and the backend's GBNF grammar leaves the random tiny model one possible reply."""
    client = make_proxy().client()
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=8,
        extra_body={"grammar": 'root ::= "world"'},
    )
    assert reply.choices[0].message.content == "world"
    completion = client.completions.create(
        model=MODEL, prompt="hello", max_tokens=8, extra_body={"grammar": 'root ::= "time"'}
    )
    assert completion.choices[0].text == "time"


def test_replies_never_reach_the_last_context_positions(make_proxy) -> None:
    """llama-cpp-python runs past max_tokens while it completes a UTF-8 character, and fails
    with a 500 once that passes n_ctx: its worker keeps the last 3 tokens free (the context
    it counts against, and reports to the proxy, is n_ctx - 3). Without max_tokens a
    completion gets OpenAI's 16 tokens or what is left, never a refusal."""
    proxy = make_proxy()
    client = proxy.client()
    count = proxy.http().post("/extras/tokenize/count", json={"input": "x"}).status_code
    assert count == 404  # the tokenizer is the backend's, not a public proxy route
    prompt = long_text(N_CTX - 12)  # N_CTX - 11 tokens with BOS
    short = client.completions.create(model=MODEL, prompt=prompt, logit_bias=NO_EOS)
    assert short.usage.prompt_tokens == N_CTX - 11 and short.usage.completion_tokens <= 8
    assert short.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError) as caught:  # asked for the whole context
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=11)
    assert caught.value.code == "context_length_exceeded"
    assert f"maximum context length is {N_CTX - 3} tokens" in caught.value.message
    fits = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, logit_bias=NO_EOS)
    assert fits.usage.prompt_tokens + fits.usage.completion_tokens <= N_CTX - 3

    # a chat reply without max_tokens runs to the end of the usable context, not past it
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": long_text(300)}],
        logit_bias=NO_EOS,
    )
    usage = reply.usage
    assert reply.choices[0].finish_reason == "length"
    assert N_CTX - 40 < usage.prompt_tokens + usage.completion_tokens <= N_CTX - 3


def test_requests_in_one_session_run_one_after_the_other(make_proxy) -> None:
    """Six turns sent to one session at once: each waits for the one before, so every turn
    is sent with all earlier turns (prompts strictly grow) and the history is whole."""
    proxy = make_proxy()

    async def turn(client: openai.AsyncOpenAI, index: int) -> int:
        reply = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"hello {index}"}],
            max_tokens=3,
            **session("together"),
        )
        return reply.usage.prompt_tokens

    async def run() -> list[int]:
        async with proxy.async_client(timeout=60.0) as client:
            return await asyncio.gather(*(turn(client, i) for i in range(6)))

    prompts = sorted(asyncio.run(run()))
    assert len(set(prompts)) == 6  # no two turns saw the same history
    stored = proxy.http().get("/v1/sessions/together").json()
    assert stored["turns"] == 6
    assert [m["role"] for m in stored["messages"]] == ["user", "assistant"] * 6
    users = sorted(m["content"] for m in stored["messages"] if m["role"] == "user")
    assert users == [f"hello {i}" for i in range(6)]
