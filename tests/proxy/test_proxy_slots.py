"""The proxy in front of llmup's slot worker: sessions reach the worker by owner and id, two
keys never share a cache, deleting a session leaves no state file, /metrics shows slots."""

from __future__ import annotations

import httpx
import pytest
from support.backend_fixtures import TEMPLATE, proxy_settings, serve_proxy
from support.ggufgen import write_llama_gguf
from support.worker_fixtures import CLEAN_WORDS, SlotWorker

from launcher.proxy.auth import owner_of
from launcher.served import StaticBackend, WorkerKind
from launcher.workers.generation import SessionKey
from launcher.workers.llamacpp_slots.slot_store import file_name

KEYS = ["key-a", "key-b"]
FIRST = "hello world the a an and of to in is it you that he"


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    folder = tmp_path_factory.mktemp("proxy-slots")
    model = write_llama_gguf(folder / "tiny-chat.gguf", chat_template=TEMPLATE, seed=5)
    # one sequence and no RAM store: a second session evicts the first to a file
    running = SlotWorker.start(model, folder / "slots", "--parallel", "1", "--slot-ram-mib", "0")
    yield running
    running.stop()


@pytest.fixture
def proxy(worker, tmp_path):
    backend = StaticBackend(
        base_url=worker.url, model_id="tiny", context=512, kind=WorkerKind.LLAMACPP_SLOTS
    )
    running = serve_proxy(proxy_settings(tmp_path / "home", api_keys=KEYS), backend)
    yield running
    running.stop()


def turn(proxy, key: str, session: str, text: str) -> dict:
    reply = proxy.http(key).post(
        "/v1/chat/completions",
        json={
            "model": "tiny",
            "messages": [{"role": "user", "content": text}],
            "max_tokens": 8,
            "temperature": 0,
            "logit_bias": CLEAN_WORDS,
        },
        headers={"X-Session-Id": session},
    )
    assert reply.status_code == 200, reply.text
    return reply.json()


def cached(reply: dict) -> int:
    return reply["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_sessions_are_kept_per_key_and_never_shared(proxy):
    first = turn(proxy, "key-a", "same-id", FIRST)
    assert cached(first) == 0
    assert cached(turn(proxy, "key-b", "same-id", FIRST)) == 0  # other key, same words
    second = turn(proxy, "key-a", "same-id", "some we can out other")
    assert cached(second) >= first["usage"]["prompt_tokens"]  # restored from its file


def test_a_deleted_session_leaves_no_state_file(proxy, worker):
    slots = worker.log.parent / "slots"
    turn(proxy, "key-a", "doomed", FIRST)
    turn(proxy, "key-a", "evictor", FIRST)  # "doomed" goes to disk
    doomed = slots / file_name(SessionKey(owner_of("key-a"), "doomed"))
    assert doomed.exists()
    http = proxy.http("key-a")
    assert http.delete("/v1/sessions/doomed").json()["deleted"] is True
    assert not doomed.exists()
    assert http.delete("/v1/sessions/evictor").status_code == 200  # held in the sequence
    stats = httpx.get(worker.url + "/slots").json()
    assert (
        stats["pinned"] == 0
        and not (slots / file_name(SessionKey(owner_of("key-a"), "evictor"))).exists()
    )


def test_metrics_report_slots(proxy):
    turn(proxy, "key-a", "metered", FIRST)
    turn(proxy, "key-a", "metered", "some we can")
    assert proxy.metric('llmup_slots{state="total"}', "key-a") == 1
    assert proxy.metric('llmup_slot_prompt_tokens{kind="reused"}', "key-a") > 0
    assert proxy.metric('llmup_slot_prompt_tokens{kind="evaluated"}', "key-a") > 0
    assert proxy.metric("llmup_slot_saved_bytes", "key-a") > 0


def test_the_proxy_lets_through_what_the_slot_worker_does(proxy):
    """Tools, min_tokens, n and logprobs reach the worker; a schema the converter cannot
    turn into a grammar is a 400 from the proxy's checker naming its part."""
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    base = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for extra in ({"tools": [tool]}, {"min_tokens": 2}, {"n": 1, "logprobs": True}):
        reply = proxy.http("key-a").post("/v1/chat/completions", json={**base, **extra})
        assert reply.status_code == 200, reply.text
    bad = {"type": "object", "properties": {"when": {"type": "date"}}}
    tools = [{"type": "function", "function": {"name": "f", "parameters": bad}}]
    reply = proxy.http("key-a").post("/v1/chat/completions", json={**base, "tools": tools})
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == "tools.0.function.parameters.properties.when"
    grammar = {**base, "grammar": 'root ::= "yes"', "max_tokens": 4}
    reply = proxy.http("key-a").post("/v1/chat/completions", json=grammar)
    assert reply.json()["choices"][0]["message"]["content"] == "yes"
