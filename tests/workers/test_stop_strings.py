"""Issue 19, finding 1: `stop` is bounded, all stops are matched in one pass, and a request
that is being parsed or tokenized never holds up the worker's event loop (`/health`, other
clients)."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import pytest
import uvicorn
from hypothesis import given
from hypothesis import strategies as st
from support.worker_fixtures import CLEAN_WORDS, SlotWorker, text_of, write_chat_model

from launcher.netaddr import free_port
from launcher.protocol import MAX_STOP_CHARS, MAX_STOPS
from launcher.workers.generation import StopScanner
from launcher.workers.llamacpp_slots import server as llamacpp_server

pytestmark = pytest.mark.timeout(180)

CHAT = "/v1/chat/completions"


def reference_cut(text: str, stops: list[str]) -> tuple[str, bool]:
    """What a stop scanner must send: the text up to the first stop string to complete
    (the longest of those ending at the same character)."""
    stops = [s for s in stops if s]
    for end in range(1, len(text) + 1):
        ending = [s for s in stops if text[:end].endswith(s)]
        if ending:
            return text[: end - max(map(len, ending))], True
    return text, False


_alphabet = st.sampled_from("ab<|/> \n")


@given(
    pieces=st.lists(st.text(_alphabet, max_size=6), max_size=12),
    stops=st.lists(st.text(_alphabet, max_size=5), max_size=6),
)
def test_the_scanner_cuts_where_a_whole_text_search_would(pieces, stops):
    """Any split of the stream into pieces gives the reference cut, and nothing after a
    stop, or of a stop, ever reaches the client."""
    scanner, sent, hit = StopScanner(stops), "", False
    for piece in pieces:
        text, hit = scanner.feed(piece)
        sent += text
        expected, _ = reference_cut("".join(pieces), stops)
        assert expected.startswith(sent)  # never ahead of what is safe to send
        if hit:
            break
    if not hit:
        sent += scanner.flush()
    assert (sent, hit) == reference_cut("".join(pieces), stops)


def test_the_held_text_is_only_what_may_begin_a_stop():
    scanner = StopScanner(["a" * MAX_STOP_CHARS] * 3 + ["</s>"])
    assert scanner.feed("x" * 1000) == ("x" * 1000, False)  # nothing could start a stop
    assert scanner.feed("y</") == ("y", False)
    assert scanner.feed("p " + "a" * 200) == ("</p ", False)  # 200 a's may begin a stop
    assert scanner.feed("a" * 50 + "b") == ("a" * 250 + "b", False)  # no longer
    assert scanner.feed("a" * (MAX_STOP_CHARS - 1)) == ("", False)
    assert scanner.feed("a!") == ("", True)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_chat_model(tmp_path_factory.mktemp("stop-model"))


@pytest.fixture(scope="module")
def worker(model, tmp_path_factory):
    running = SlotWorker.start(model, tmp_path_factory.mktemp("w") / "slots")
    yield running
    running.stop()


def test_too_many_or_too_long_stops_are_a_400_at_the_worker(worker):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for stop in (["x"] * (MAX_STOPS + 1), ["x" * (MAX_STOP_CHARS + 1)], "x" * 300):
        reply = httpx.post(worker.url + CHAT, json={**body, "stop": stop}, timeout=60)
        assert reply.status_code == 400, reply.text
        assert reply.json()["error"]["param"] == "stop"
    completion = {"model": "tiny", "prompt": "hi", "max_tokens": 2, "stop": ["x"] * 17}
    reply = httpx.post(worker.url + "/v1/completions", json=completion, timeout=60)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "stop"


def test_sixteen_long_stops_are_honoured(worker):
    """The most `stop` may hold still works: the reply ends before the one that appears."""
    messages = [{"role": "user", "content": "hello world the a an and of"}]
    fields = {"max_tokens": 12, "logit_bias": CLEAN_WORDS}
    free = text_of(worker.chat(messages, **fields))
    word = free.split()[3]
    stops = [chr(0x4E00 + i) * MAX_STOP_CHARS for i in range(MAX_STOPS - 1)] + [" " + word]
    cut = worker.chat(messages, **fields, stop=stops)
    assert cut["choices"][0]["finish_reason"] == "stop"
    assert text_of(cut) == free[: free.index(" " + word)]


class _GatedPrompts:
    """The worker's chat renderer, held inside for a prompt that carries `marker`: the test
    sees `entered` and decides when it may go on (`release`)."""

    def __init__(self, render, marker: str) -> None:
        self.render, self.marker = render, marker
        self.entered, self.release = threading.Event(), threading.Event()

    def __call__(self, turns):
        if any(self.marker in (m["content"] or "") for m in turns.messages):
            self.entered.set()
            assert self.release.wait(120), "the test never released the prompt"
        return self.render(turns)


def _serve(app) -> tuple[uvicorn.Server, threading.Thread, str]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if server.started:
            return server, thread, url
        thread.join(0.05)
    raise RuntimeError("the worker did not start")


def test_health_and_other_clients_are_answered_while_a_prompt_is_prepared(model):
    """The big request is stopped inside prompt preparation (rendering, then tokenizing):
    on the event loop that would leave /health unanswered until it ends. Here /health and
    a small request both complete while it is still held there, and it then completes."""
    args = llamacpp_server.build_parser().parse_args(
        ["--model", str(model), "--port", "0", "--threads", "1", "--parallel", "2"]
    )
    native, ctx, options = llamacpp_server.load(args)
    identity = llamacpp_server.state_identity(Path(model), options)
    app = llamacpp_server.create_app(
        native, ctx, identity, llamacpp_server.SlotOptions(None), model_alias="tiny"
    )
    gate = _GatedPrompts(app.state.llmup.chat_prompt, marker="BIG")
    app.state.llmup.chat_prompt = gate
    server, thread, url = _serve(app)
    big_reply: list[httpx.Response] = []
    big = {"model": "tiny", "messages": [{"role": "user", "content": "BIG " + "hello " * 200_000}]}
    sender = threading.Thread(
        target=lambda: big_reply.append(httpx.post(url + CHAT, json=big, timeout=120))
    )
    try:
        sender.start()
        assert gate.entered.wait(60), "the big request never reached prompt preparation"
        health = httpx.get(url + "/health", timeout=60)
        small = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        other = httpx.post(url + CHAT, json=small, timeout=60)
        assert not gate.release.is_set() and not big_reply  # the big one is still held
        assert health.status_code == 200 and health.json()["status"] == "ok"
        assert other.status_code == 200, other.text
        gate.release.set()
        sender.join(120)
        assert big_reply[0].status_code == 400  # a million tokens exceed the context
        assert big_reply[0].json()["error"]["code"] == "context_length_exceeded"
    finally:
        gate.release.set()
        server.should_exit = True
        thread.join(30)
