"""Issue 19, finding 11: each API key has its own bounds (requests at once, sessions, stored
bytes), answered with a 429 that says which; keys take turns at the backend; and the
token-count cache is kept per key, so it cannot tell one key what another sent. The limits
kept in the session store run on SQLite and on a real PostgreSQL, where replicas sharing it
share each key's counts."""

from __future__ import annotations

import asyncio
import threading

import openai
import pytest
from support.backend_fixtures import MODEL, NO_EOS

from launcher.errors import KeyLimitError, QueueFullError
from launcher.protocol import PROMPT_TOKENS_PATH
from launcher.proxy.limits import Admission

pytestmark = pytest.mark.timeout(180)

KEYS = ["key-a", "key-b"]
CHAT = "/v1/chat/completions"


def _chat(proxy, key: str, text: str, session: str | None = None):
    headers = {"X-Session-Id": session} if session else {}
    body = {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 2}
    return proxy.http(key).post(CHAT, json=body, headers=headers)


def _limit_error(response, code: str) -> str:
    assert response.status_code == 429, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["type"] == "requests", error
    return error["message"]


def test_admission_bounds_each_owner_and_gives_places_in_turn():
    async def scenario() -> list[str]:
        admission = Admission(max_inflight=1, queue_size=10, retry_after_s=1, per_key=3)
        granted: list[str] = []

        async def request(owner: str, name: str, hold: asyncio.Event) -> None:
            async with admission.admit(owner), admission.slot(owner):
                granted.append(name)
                await hold.wait()

        go = asyncio.Event()
        first = asyncio.create_task(request("a", "a1", go))
        await asyncio.sleep(0)  # a1 holds the only place
        tasks = [asyncio.create_task(request("a", f"a{i}", go)) for i in (2, 3)]
        tasks.append(asyncio.create_task(request("b", "b1", go)))
        await asyncio.sleep(0)
        with pytest.raises(KeyLimitError) as caught:  # a has 3 queued or running
            async with admission.admit("a"):
                pass
        assert caught.value.code == "requests_per_key_exceeded"
        assert caught.value.headers["Retry-After"] == "1"
        go.set()
        await asyncio.gather(first, *tasks)
        return granted

    # b1 came after a2 and a3 but goes before a3: owners take turns
    assert asyncio.run(scenario()) == ["a1", "a2", "b1", "a3"]


def test_a_full_queue_is_still_the_queue_limit():
    async def scenario() -> None:
        admission = Admission(max_inflight=1, queue_size=0, retry_after_s=1, per_key=5)
        async with admission.admit("a"):
            with pytest.raises(QueueFullError):
                async with admission.admit("b"):
                    pass

    asyncio.run(scenario())


def test_a_cancelled_waiter_gives_its_turn_on():
    async def scenario() -> list[str]:
        admission = Admission(max_inflight=1, queue_size=5, retry_after_s=1)
        order: list[str] = []

        async def request(owner: str) -> None:
            async with admission.slot(owner):
                order.append(owner)
                await asyncio.sleep(0)

        async with admission.slot("a"):
            gone = asyncio.create_task(request("b"))
            kept = asyncio.create_task(request("c"))
            await asyncio.sleep(0)
            gone.cancel()
        await kept
        assert gone.cancelled()
        return order

    assert asyncio.run(scenario()) == ["c"]


def test_requests_per_key(make_proxy) -> None:
    proxy = make_proxy(api_keys=KEYS, max_requests_per_key=1)
    a = proxy.client("key-a")
    stream = a.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "go on"}], max_tokens=460,
        stream=True, logit_bias=NO_EOS,
    )  # fmt: skip
    next(iter(stream))  # key-a's one request is at the backend
    message = _limit_error(_chat(proxy, "key-a", "me too"), "requests_per_key_exceeded")
    assert "LLMUP_PROXY__MAX_REQUESTS_PER_KEY" in message
    other: list = []
    thread = threading.Thread(target=lambda: other.append(_chat(proxy, "key-b", "and me")))
    thread.start()  # key-b is admitted; it waits for the backend, which serves one at a time
    stream.close()
    thread.join(60)
    assert other[0].status_code == 200, other[0].text
    assert _chat(proxy, "key-a", "me too").status_code == 200  # its place is free again


def test_sessions_per_key(make_proxy, store_target) -> None:
    proxy = make_proxy(api_keys=KEYS, max_sessions_per_key=2, sessions_db=store_target)
    for session in ("one", "two"):
        assert _chat(proxy, "key-a", "hi", session).status_code == 200
    message = _limit_error(_chat(proxy, "key-a", "hi", "three"), "sessions_per_key_exceeded")
    assert "LLMUP_PROXY__MAX_SESSIONS_PER_KEY" in message
    assert _chat(proxy, "key-a", "more", "one").status_code == 200  # an existing one goes on
    assert _chat(proxy, "key-b", "hi", "three").status_code == 200  # another key's own
    assert proxy.http("key-a").get("/v1/sessions/three").status_code == 404  # nothing stored
    assert proxy.http("key-a").delete("/v1/sessions/two").status_code == 200
    assert _chat(proxy, "key-a", "hi", "three").status_code == 200


def test_stored_bytes_per_key(make_proxy, store_target) -> None:
    proxy = make_proxy(api_keys=KEYS, max_stored_bytes_per_key=2000, sessions_db=store_target)
    client = proxy.client("key-a")
    text = "hello world " * 50  # about 600 bytes stored per turn
    turns = 0
    with pytest.raises(openai.RateLimitError) as caught:
        for _ in range(10):
            client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": text}], max_tokens=2,
                extra_headers={"X-Session-Id": "big"},
            )  # fmt: skip
            turns += 1
    assert caught.value.code == "storage_per_key_exceeded"
    assert "LLMUP_PROXY__MAX_STORED_BYTES_PER_KEY" in caught.value.message
    assert 2 <= turns <= 3  # refused before it passed 2000 bytes (by at most one reply)
    assert proxy.http("key-a").get("/v1/sessions/big").json()["turns"] == turns
    assert _chat(proxy, "key-b", text, "big").status_code == 200
    assert proxy.http("key-a").delete("/v1/sessions/big").status_code == 200
    assert _chat(proxy, "key-a", text, "again").status_code == 200  # room again


def test_replicas_sharing_a_database_share_each_keys_limits(make_proxy, pg_url) -> None:
    """What a key stored through one replica counts on the other: two replicas do not let a
    key keep twice its sessions."""
    first, second = (
        make_proxy(api_keys=KEYS, max_sessions_per_key=2, sessions_db=pg_url, replica_name=name)
        for name in ("r1", "r2")
    )
    assert _chat(first, "key-a", "hi", "one").status_code == 200
    assert _chat(second, "key-a", "hi", "two").status_code == 200
    for replica in (first, second):
        _limit_error(_chat(replica, "key-a", "hi", "three"), "sessions_per_key_exceeded")
    assert first.http("key-a").delete("/v1/sessions/one").status_code == 200
    assert _chat(second, "key-a", "hi", "three").status_code == 200  # the room, seen there


def test_the_token_count_cache_is_kept_per_key(make_proxy, tiny_backend) -> None:
    """A text counted for one key is counted again for another: a cache hit (a faster
    reply) never tells key-b that key-a sent the same text. The backend's access log shows
    each count the proxy asks for."""
    proxy = make_proxy(api_keys=KEYS)
    log = tiny_backend.log_path

    def counts_asked(key: str) -> int:
        before = log.read_text().count(PROMPT_TOKENS_PATH)
        assert _chat(proxy, key, "a secret only key-a has written").status_code == 200
        return log.read_text().count(PROMPT_TOKENS_PATH) - before

    assert [counts_asked(k) for k in ("key-a", "key-a", "key-b", "key-b")] == [1, 0, 1, 0]


def test_conversations_and_their_items_count_against_the_keys_limits(make_proxy) -> None:
    proxy = make_proxy(api_keys=KEYS, max_sessions_per_key=1, max_stored_bytes_per_key=2000)
    http = proxy.http("key-a")
    made = http.post("/v1/conversations", json={"items": [{"role": "user", "content": "hi"}]})
    assert made.status_code == 200, made.text
    _limit_error(http.post("/v1/conversations", json={}), "sessions_per_key_exceeded")
    items = f"/v1/conversations/{made.json()['id']}/items"
    big = {"items": [{"type": "message", "role": "user", "content": "hello world " * 100}]}
    assert http.post(items, json=big).status_code == 200
    message = _limit_error(http.post(items, json=big), "storage_per_key_exceeded")
    assert "LLMUP_PROXY__MAX_STORED_BYTES_PER_KEY" in message
    assert len(http.get(items).json()["data"]) == 2  # the refused items were not stored
    assert proxy.http("key-b").post("/v1/conversations", json=big).status_code == 200
