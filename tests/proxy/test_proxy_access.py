"""Who may reach the proxy: the key before the body, the Host header without keys (DNS
rebinding), and what /health tells a caller without a key. Real uvicorn, real backend."""

from __future__ import annotations

import json
import socket

import anyio
import httpx
import pytest
from support.backend_fixtures import MODEL

from launcher.loading import loading_app
from launcher.proxy.auth import KeyRing
from launcher.proxy.replica import REPLICA_HEADER

pytestmark = pytest.mark.timeout(180)

CHAT = "/v1/chat/completions"
HELLO = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
REBIND = "rebind.attacker.example"


def _deep(levels: int) -> str:
    return "[" * levels + "]" * levels


def _started_session(http: httpx.Client, session: str) -> None:
    reply = http.post(CHAT, json=HELLO, headers={"X-Session-Id": session})
    assert reply.status_code == 200, reply.text
    assert http.get(f"/v1/sessions/{session}").json()["messages"], "the session was stored"


# ----- the key comes first


@pytest.mark.parametrize(
    "body",
    [
        '{"model": "tiny", "messages": ' + _deep(1000) + "}",  # far past the depth check
        '{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}',
        "{not json",
        "",
    ],
    ids=["1000-deep", "surrogate", "malformed", "empty"],
)
def test_no_key_is_401_before_the_body_is_looked_at(make_proxy, body) -> None:
    proxy = make_proxy(api_keys=["k"])
    headers = {"content-type": "application/json"}
    for path in (CHAT, "/v1/completions", "/v1/embeddings"):
        for key in (None, "wrong"):
            reply = proxy.http(key).post(path, content=body, headers=headers)
            assert reply.status_code == 401, (path, reply.text)
            assert reply.json()["error"]["code"] == "invalid_api_key"
    # with the key, the same body is judged on its merits: a 400, never a 422
    judged = proxy.http("k").post(CHAT, content=body, headers=headers)
    assert judged.status_code == 400 and judged.json()["error"]["type"] == "invalid_request_error"


def test_every_route_but_health_and_the_page_needs_the_key(make_proxy) -> None:
    http = make_proxy(api_keys=["k"]).http()
    for method, path in [
        ("GET", "/v1/models"), ("GET", "/v1/sessions"), ("GET", "/v1/sessions/x"),
        ("DELETE", "/v1/sessions/x"), ("GET", "/v1/plan"), ("GET", "/metrics"),
        ("GET", "/openapi.json"), ("GET", "/v1/no-such-route"),
    ]:  # fmt: skip
        assert http.request(method, path).status_code == 401, path
    assert http.get("/health").status_code == 200
    assert http.get("/").status_code == 200 and http.get("/web/app.js").status_code == 200
    big = b"x" * (5 * 1024 * 1024)  # over the 4 MiB limit: still the key first
    assert http.post(CHAT, content=big).status_code == 401
    assert make_proxy(api_keys=["k"]).http("k").post(CHAT, content=big).status_code == 413


# ----- /health: the status for everyone, the details for key holders


def test_health_without_a_key_tells_only_the_status(make_proxy) -> None:
    proxy = make_proxy(api_keys=["k"])
    for key in (None, "wrong"):
        reply = proxy.http(key).get("/health")
        assert reply.status_code == 200 and reply.json() == {"status": "ok"}, reply.text
    full = proxy.http("k").get("/health").json()
    assert full["status"] == "ok" and full["model"] == MODEL
    assert {"state", "restarts"} <= set(full["backend"]) and "context" in full


def test_loading_health_hides_the_plan_from_callers_without_a_key() -> None:
    summary = {"model": "llama-2-70b-chat", "context": 4096, "quant": "Q4_K_M"}
    app = loading_app(summary, KeyRing(["k"]), replica="r1")

    async def get(headers: dict[str, str]) -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as c:
            return await c.get("/health", headers=headers)

    bare = anyio.run(get, {})
    assert bare.status_code == 503 and bare.json() == {"status": "loading"}
    full = anyio.run(get, {"Authorization": "Bearer k"})
    assert full.status_code == 503 and full.json()["plan"]["model"] == "llama-2-70b-chat"
    assert bare.headers[REPLICA_HEADER] == full.headers[REPLICA_HEADER] == "r1"


# ----- keyless mode: the Host header (DNS rebinding)


def test_keyless_proxy_refuses_a_rebound_host_name(make_proxy) -> None:
    proxy = make_proxy()
    http = proxy.http()
    _started_session(http, "mine")
    port = proxy.url.rsplit(":", 1)[1]
    forged = {"Host": f"{REBIND}:{port}"}
    attempts = [
        http.get("/v1/sessions/mine", headers=forged),
        http.get("/v1/sessions", headers=forged),
        http.post(CHAT, json=HELLO, headers={**forged, "X-Session-Id": "mine"}),
        http.delete("/v1/sessions/mine", headers=forged),
        http.get("/health", headers=forged),
        http.get("/", headers=forged),
    ]
    for reply in attempts:
        assert reply.status_code == 400, reply.text
        error = reply.json()["error"]
        assert error["code"] == "invalid_host" and "--allowed-host" in error["message"]
        assert set(reply.json()) == {"error"}  # nothing of the conversation
    session = http.get("/v1/sessions/mine").json()  # still there, one turn, untouched
    assert len(session["messages"]) == 2


@pytest.mark.parametrize(
    "host",
    ["localhost", "LOCALHOST.", "app.localhost", "127.0.0.1", "127.0.0.2", "[::1]",
     "192.168.1.20", socket.gethostname()],
)  # fmt: skip
def test_keyless_proxy_answers_loopback_addresses_and_its_own_name(make_proxy, host) -> None:
    proxy = make_proxy()
    port = proxy.url.rsplit(":", 1)[1]
    for value in (host, f"{host}:{port}"):
        reply = proxy.http().get("/v1/models", headers={"Host": value})
        assert reply.status_code == 200, (value, reply.text)


def test_allowed_hosts_and_keys_lift_the_check(make_proxy) -> None:
    named = make_proxy(allowed_hosts=["llm.lan"]).http()
    assert named.get("/v1/models", headers={"Host": "LLM.lan:8000"}).status_code == 200
    assert named.get("/v1/models", headers={"Host": REBIND}).status_code == 400
    anything = make_proxy(allowed_hosts=["*"]).http()
    assert anything.get("/v1/models", headers={"Host": REBIND}).status_code == 200
    keyed = make_proxy(api_keys=["k"])  # a rebinding page cannot send the key
    assert keyed.http("k").get("/v1/models", headers={"Host": REBIND}).status_code == 200


def test_the_loading_app_checks_the_host_too() -> None:
    app = loading_app({"model": "tiny"}, KeyRing([]), replica="r2")

    async def get(host: str) -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=f"http://{host}") as c:
            return await c.get("/health")

    assert anyio.run(get, "127.0.0.1:8000").status_code == 503  # loading
    refused = anyio.run(get, REBIND)
    assert (
        refused.status_code == 400 and json.loads(refused.text)["error"]["code"] == "invalid_host"
    )
    assert refused.headers[REPLICA_HEADER] == "r2"  # the guard's refusal names the replica
