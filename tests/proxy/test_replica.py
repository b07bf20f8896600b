"""A replica names itself on every answer (X-Llmup-Replica), errors included; the ids it will
hand out carry its name for the load balancer; a session database that stops answering is a
503 with Retry-After for session turns only, and service resumes when it is back."""

from __future__ import annotations

import time

import httpx
import pytest
from conftest import run_cli
from support.backend_fixtures import MODEL, NO_EOS
from support.cluster import PostgresServer
from support.ggufgen import write_llama_gguf

from launcher.netaddr import free_port
from launcher.proxy.replica import REPLICA_HEADER, replica_of, routed_id
from launcher.settings import Settings, default_replica_name

pytestmark = pytest.mark.timeout(180)

KEY = "replica-test-key"
CHAT = "/v1/chat/completions"


def chat(text: str, **extra) -> dict:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": 3,
        **extra,
    }


def test_every_answer_names_the_replica(make_proxy) -> None:
    proxy = make_proxy(api_keys=[KEY], replica_name="r7", max_body_bytes=4096)
    keyed, anonymous = proxy.http(KEY), proxy.http()
    answers = {
        "chat": keyed.post(CHAT, json=chat("hi"), headers={"X-Session-Id": "s"}),
        "health": anonymous.get("/health"),
        "page": anonymous.get("/"),
        "metrics": keyed.get("/metrics"),
        "sessions": keyed.get("/v1/sessions"),
        "no key": anonymous.get("/v1/models"),
        "bad request": keyed.post(CHAT, json={"model": MODEL}),
        "unknown route": keyed.get("/v1/nothing"),
        "wrong method": keyed.delete("/v1/models"),
        "unknown session": keyed.get("/v1/sessions/none"),
        "too large": keyed.post(CHAT, content=b"{" + b" " * 8192 + b"}"),
        "health with key": keyed.get("/health"),
        "wrong key, with a body": anonymous.post(
            CHAT, json=chat("hi"), headers={"Authorization": "Bearer wrong"}
        ),
    }
    keyless = make_proxy(replica_name="r8").http()  # the Host check (no keys)
    rebound = keyless.get("/v1/models", headers={"Host": "rebind.attacker.example"})
    statuses = {name: reply.status_code for name, reply in answers.items()}
    assert statuses == {
        "chat": 200, "health": 200, "page": 200, "metrics": 200, "sessions": 200,
        "no key": 401, "bad request": 400, "unknown route": 404, "wrong method": 405,
        "unknown session": 404, "too large": 413, "health with key": 200,
        "wrong key, with a body": 401,
    }  # fmt: skip
    assert {name: r.headers.get(REPLICA_HEADER) for name, r in answers.items()} == dict.fromkeys(
        answers, "r7"
    )
    assert rebound.status_code == 400 and rebound.json()["error"]["code"] == "invalid_host"
    assert rebound.headers[REPLICA_HEADER] == "r8"
    with keyed.stream("POST", CHAT, json=chat("hi", stream=True)) as stream:
        assert stream.headers[REPLICA_HEADER] == "r7"
    # without a key /health tells only the status (what HAProxy's checks read), named all
    # the same; a key holder also sees the name in the body
    assert answers["health"].json() == {"status": "ok"}
    assert answers["health with key"].json()["replica"] == "r7"


def test_ids_carry_the_replica_that_made_them() -> None:
    made = routed_id("resp", "r2")
    assert made.startswith("resp_r2_") and len(made.split("_")[2]) == 48
    assert (
        replica_of(made) == "r2" and replica_of(routed_id("conv", "box-1.local")) == "box-1.local"
    )
    assert routed_id("resp", "r2") != made
    assert replica_of("resp_abc") is None and replica_of("chatcmpl-1") is None


def test_replica_name_and_store_address_are_checked(monkeypatch) -> None:
    assert Settings().proxy.replica_name == default_replica_name()
    monkeypatch.setenv("LLMUP_PROXY__REPLICA_NAME", "r1")
    monkeypatch.setenv("LLMUP_PROXY__SESSIONS_DB", "postgresql://u@db/llmup")
    assert Settings().proxy.replica_name == "r1"
    assert Settings().proxy.sessions_db == "postgresql://u@db/llmup"
    for flag, value, said in (
        ("--replica-name", "r_1", "1-63 letters, digits"),
        ("--sessions-db", "mysql://u@db/x", "must be a postgresql:// URL"),
    ):
        done = run_cli("serve", "--model-file", "x.gguf", flag, value)
        assert done.returncode == 2 and said in done.stderr, done.stderr
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_unreachable_database_at_start_is_one_line(tmp_path) -> None:
    url = f"postgresql://llmup@127.0.0.1:{free_port()}/llmup"
    model = write_llama_gguf(tmp_path / "tiny.gguf")
    done = run_cli(
        "serve", "--model-file", str(model), "--sessions-db", url,
        env={"LLMUP_PROXY__SESSIONS_DB_TIMEOUT_S": "2"},
    )  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("error: cannot open the session store postgresql://llmup@127")


def test_database_down_refuses_turns_with_retry_after_and_comes_back(make_proxy) -> None:
    server = PostgresServer(free_port()).start()
    try:
        url = server.create_database("llmup")
        proxy = make_proxy(sessions_db=url, sessions_db_timeout_s=2, retry_after_s=3)
        http = proxy.http()
        assert http.post(CHAT, json=chat("one"), headers={"X-Session-Id": "s"}).status_code == 200
        server.stop("fast")
        for body in (chat("two"), chat("two", stream=True)):
            down = http.post(CHAT, json=body, headers={"X-Session-Id": "s"})
            assert down.status_code == 503 and down.headers["retry-after"] == "3"
            assert down.json()["error"]["code"] == "sessions_store_unavailable"
        assert http.post(CHAT, json=chat("stateless")).status_code == 200  # no session: served
        assert http.get("/health").status_code == 200  # the replica stays in the balancer
        server.start()
        answered = eventually(
            lambda: http.post(CHAT, json=chat("two"), headers={"X-Session-Id": "s"})
        )
        assert answered.status_code == 200
        stored = http.get("/v1/sessions/s").json()
        assert [m["content"] for m in stored["messages"] if m["role"] == "user"] == ["one", "two"]
    finally:
        server.remove()


def test_database_lost_while_a_reply_streams_stores_nothing_and_says_so(make_proxy) -> None:
    server = PostgresServer(free_port()).start()
    try:
        url = server.create_database("llmup")
        proxy = make_proxy(sessions_db=url, sessions_db_timeout_s=2)
        http = proxy.http()
        http.post(CHAT, json=chat("one"), headers={"X-Session-Id": "s"}).raise_for_status()
        body = chat("long", stream=True, max_tokens=300, logit_bias=NO_EOS)
        with http.stream("POST", CHAT, json=body, headers={"X-Session-Id": "s"}) as stream:
            lines = stream.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            server.stop("fast")  # gone before the reply ends: it cannot be stored
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] != "data: [DONE]" and "sessions_store_unavailable" in rest[-1]
        server.start()
        stored = eventually(lambda: http.get("/v1/sessions/s"))
        assert stored.json()["turns"] == 1  # the broken turn is not there, half or whole
    finally:
        server.remove()


def eventually(call, timeout: float = 60) -> httpx.Response:
    """`call()`'s response once it is no longer a 503 (polled, not timed)."""
    deadline = time.monotonic() + timeout
    while True:
        reply = call()
        if reply.status_code != 503 or time.monotonic() > deadline:
            return reply
        time.sleep(0.3)
