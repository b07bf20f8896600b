"""llmup's llama.cpp worker as a process: OpenAI routes, session slots over HTTP, saved
states on disk across a restart and a delete, bounded memory over many turns."""

from __future__ import annotations

import json
import threading

import httpx
import openai
import psutil
import pytest
from support.backend_fixtures import TEMPLATE
from support.ggufgen import write_llama_gguf
from support.worker_fixtures import CLEAN_WORDS, SlotWorker, cached_of, session_headers, text_of

from launcher.runkey import KEY_ENV
from launcher.workers.generation import SessionKey
from launcher.workers.llamacpp_slots.slot_store import file_name

ALICE, BOB = "a" * 32, "b" * 32
USERS = [
    "hello world the a an and of to in is it you that he",
    "some we can out other were all there when up use your how",
    "said each she which do their time if will way about many then",
]
REPLY = {"max_tokens": 12, "logit_bias": CLEAN_WORDS}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slot-model")
    return write_llama_gguf(folder / "tiny-chat.gguf", chat_template=TEMPLATE, seed=3)


@pytest.fixture(scope="module")
def worker(model, tmp_path_factory):
    running = SlotWorker.start(model, tmp_path_factory.mktemp("w") / "slots", "--parallel", "2")
    yield running
    running.stop()


def chat_turns(worker: SlotWorker, session: tuple[str, str] | None, turns: int) -> list[dict]:
    """A conversation whose history the client resends each turn, as the proxy does."""
    messages, replies = [], []
    for user in USERS[:turns]:
        messages.append({"role": "user", "content": user})
        reply = worker.chat(messages, session, **REPLY)
        replies.append(reply)
        messages.append({"role": "assistant", "content": text_of(reply)})
    return replies


def test_openai_client_chat_stream_and_models(worker):
    client = openai.OpenAI(base_url=worker.url + "/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == ["tiny"]
    done = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": USERS[0]}], max_tokens=5
    )
    assert done.usage.completion_tokens <= 5 and done.choices[0].finish_reason in ("stop", "length")
    stream = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": USERS[0]}],
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=REPLY | {"max_tokens": 6},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage.completion_tokens == 6 and text
    count = httpx.post(worker.url + "/extras/tokenize/count", json={"input": "hello world"})
    assert count.json()["count"] == 3  # BOS, ▁hello, ▁world
    assert httpx.get(worker.url + "/health").json()["status"] == "ok"


def test_a_session_reuses_its_prefix_and_answers_as_a_fresh_request(worker):
    kept = chat_turns(worker, (ALICE, "chat"), 3)
    fresh = chat_turns(worker, None, 3)
    assert [text_of(r) for r in kept] == [text_of(r) for r in fresh]
    assert cached_of(kept[0]) == 0
    for before, reply in zip(kept, kept[1:]):  # the whole previous prompt, and the reply
        assert (
            before["usage"]["prompt_tokens"] <= cached_of(reply) < reply["usage"]["prompt_tokens"]
        )
    assert all(cached_of(r) == 0 for r in fresh)


def test_two_keys_with_identical_first_messages_share_nothing(worker):
    first = [{"role": "user", "content": "two keys same words " + USERS[1]}]
    assert cached_of(worker.chat(first, (ALICE, "twin"), **REPLY)) == 0
    assert cached_of(worker.chat(first, (BOB, "twin"), **REPLY)) == 0
    assert cached_of(worker.chat(first, (ALICE, "twin-2"), **REPLY)) == 0
    again = worker.chat(first, (BOB, "twin"), **REPLY)
    assert cached_of(again) == again["usage"]["prompt_tokens"] - 1


def test_bad_extras_and_headers_are_400s(worker):
    url = worker.url + "/v1/chat/completions"
    base = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    cases = [
        ({**base, "logit_bias": {"99999": 1}}, {}, "logit_bias"),
        ({**base, "grammar": "root ::= ("}, {}, "grammar"),
        ({**base, "top_k": -1}, {}, "top_k"),
        ({**base, "min_tokens": -1}, {}, "min_tokens"),
        ({**base, "mirostat_mode": 3}, {}, "mirostat_mode"),
        (base, {"X-Llmup-Session": "only-half"}, "needs X-Llmup-Owner"),
    ]
    for body, headers, needle in cases:
        reply = httpx.post(url, json=body, headers=headers)
        assert reply.status_code == 400 and needle in reply.json()["error"]["message"]


def test_grammar_and_json_schema_shape_the_reply(worker):
    messages = [{"role": "user", "content": USERS[0]}]
    yes_no = worker.chat(messages, grammar='root ::= "yes" | "no"', max_tokens=5)
    assert text_of(yes_no) in ("yes", "no")
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    shaped = worker.chat(
        messages, response_format={"type": "json_object", "schema": schema}, max_tokens=40
    )
    assert set(json.loads(text_of(shaped))) == {"ok"}


def test_a_client_that_disconnects_frees_its_sequence(model, tmp_path):
    worker = SlotWorker.start(model, tmp_path / "slots", "--parallel", "1")
    try:
        body = {
            "model": "tiny",
            "messages": [{"role": "user", "content": USERS[0]}],
            "max_tokens": 400,
            "stream": True,
            **{"logit_bias": CLEAN_WORDS},
        }
        with httpx.stream("POST", worker.url + "/v1/chat/completions", json=body) as stream:
            next(stream.iter_lines())  # generation is under way; then hang up
        reply = worker.chat([{"role": "user", "content": USERS[1]}], **REPLY)
        assert reply["usage"]["completion_tokens"] == 12
        stats = httpx.get(worker.url + "/slots").json()
        assert stats["in_use"] == 0 and stats["generated_tokens"] < 400
    finally:
        worker.stop()


def test_sessions_survive_a_restart_and_a_delete_leaves_no_file(model, tmp_path):
    slots = tmp_path / "slots"
    reference = chat_turns_with_restart(model, slots, None)
    kept = chat_turns_with_restart(model, slots, (ALICE, "persist"))
    assert [text_of(r) for r in kept] == [text_of(r) for r in reference]
    assert cached_of(kept[2]) > 0  # turn 3 ran on a new worker, restored from disk
    path = slots / file_name(SessionKey(ALICE, "persist"))
    assert path.exists()
    worker = SlotWorker.start(model, slots)
    try:
        url = worker.url + "/slots"
        gone = httpx.delete(url, headers=session_headers(ALICE, "persist"))
        assert gone.json() == {"deleted": True} and not path.exists()
        assert httpx.delete(url, headers=session_headers(ALICE, "persist")).json() == {
            "deleted": False
        }
    finally:
        worker.stop()


def chat_turns_with_restart(model, slots, session) -> list[dict]:
    """Two turns, a clean stop (the worker saves its sessions), then a third turn."""
    worker = SlotWorker.start(model, slots, "--parallel", "2")
    try:
        replies = chat_turns(worker, session, 2)
    finally:
        worker.stop()  # uvicorn re-raises SIGTERM after its graceful shutdown: exit -15
    saved = "saved 1 session state(s)" if session else "saved 0 session state(s)"
    assert saved in worker.log_text()
    worker = SlotWorker.start(model, slots, "--parallel", "2")
    try:
        messages = []
        for user, reply in zip(USERS, replies):
            messages += [
                {"role": "user", "content": user},
                {"role": "assistant", "content": text_of(reply)},
            ]
        messages.append({"role": "user", "content": USERS[2]})
        replies.append(worker.chat(messages, session, **REPLY))
        if session is not None:
            assert httpx.get(worker.url + "/slots").json()["restores"]["disk"] == 1
    finally:
        worker.stop()
    return replies


def test_memory_stays_flat_over_200_turns(model, tmp_path):
    """Six sessions on two sequences, saved states spilling from a 1 MiB RAM store to a
    4 MiB disk budget: RSS after 200 turns within 10% of RSS after 20."""
    worker = SlotWorker.start(
        model, tmp_path / "slots", "--parallel", "2", "--slot-ram-mib", "1", "--slot-disk-mib", "4"
    )
    process = psutil.Process(worker.proc.pid)
    histories: dict[int, list[dict]] = {i: [] for i in range(6)}
    rss = {}
    try:
        for turn in range(1, 201):
            who = turn % 6
            history = histories[who]
            if len(history) >= 10:  # a fresh conversation once this one is long
                history.clear()
            history.append({"role": "user", "content": USERS[turn % 3]})
            reply = worker.chat(history, (ALICE, f"rss-{who}-{turn // 60}"), **REPLY)
            history.append({"role": "assistant", "content": text_of(reply)})
            if turn in (20, 200):
                rss[turn] = process.memory_info().rss
        stats = httpx.get(worker.url + "/slots").json()
    finally:
        worker.stop()
    assert stats["saves"] > 50 and stats["restores"]["ram"] + stats["restores"]["disk"] > 50
    assert stats["ram_bytes"] <= 1 << 20 and stats["disk_bytes"] <= 4 << 20
    assert rss[200] <= rss[20] * 1.10, rss


def test_without_the_runs_key_the_worker_answers_nothing(model, tmp_path):
    worker = SlotWorker.start(model, tmp_path / "slots", env={KEY_ENV: "run-key"})
    try:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        url = worker.url + "/v1/chat/completions"
        assert httpx.post(url, json=body).status_code == 401
        wrong = {"Authorization": "Bearer other"}
        assert httpx.post(url, json=body, headers=wrong).status_code == 401
        right = {"Authorization": "Bearer run-key"}
        assert httpx.post(url, json=body, headers=right).status_code == 200
        assert httpx.get(worker.url + "/slots").status_code == 401
    finally:
        worker.stop()


def test_the_worker_listens_on_loopback_only(worker):
    listening = [
        c.laddr
        for c in psutil.Process(worker.proc.pid).connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN
    ]
    assert [(a.ip, a.port) for a in listening] == [("127.0.0.1", worker.port)]


def test_concurrent_sessions_answer_like_sequential_ones(worker):
    prompts = [[{"role": "user", "content": f"{u} number {i}"}] for i, u in enumerate(USERS)]
    alone = [text_of(worker.chat(p, **REPLY)) for p in prompts]
    together: list[str | None] = [None] * len(prompts)

    def one(i: int) -> None:
        together[i] = text_of(worker.chat(prompts[i], (BOB, f"conc-{i}"), **REPLY))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert together == alone
