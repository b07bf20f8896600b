"""The backend dies in the middle of a streamed reply: the proxy and the session survive."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import openai
import pytest
from support.backend_fixtures import (
    MODEL,
    NO_EOS,
    TEMPLATE,
    proxy_settings,
    serve_proxy,
    served,
    start_backend,
)
from support.ggufgen import write_llama_gguf

from launcher.backends.spec import BackendSpec
from launcher.backends.supervise.supervisor import Supervisor
from launcher.errors import BadRequestError
from launcher.netaddr import free_port
from launcher.proxy.crashes import CrashMemory
from launcher.runkey import new_backend_key
from launcher.served import WorkerKind

pytestmark = pytest.mark.timeout(240)


def _wait_restarted(supervisor, restarts: int = 1, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not (supervisor.restarts >= restarts and supervisor.state == "ready"):
        assert time.monotonic() < deadline, f"no restart: {supervisor.state}"
        time.sleep(0.05)


def test_backend_killed_mid_stream(tmp_path: Path) -> None:
    supervisor = start_backend(tmp_path / "backend")
    proxy = serve_proxy(proxy_settings(tmp_path / "home"), served(supervisor))
    try:
        client = proxy.client()
        sid = {"X-Session-Id": "crash"}
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "first"}], max_tokens=3,
            extra_headers=sid,
        )  # fmt: skip
        stream = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "second"}], max_tokens=460,
            stream=True, logit_bias=NO_EOS, extra_headers=sid,
        )  # fmt: skip
        pieces = []
        with pytest.raises(openai.APIError) as caught:
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    pieces.append(chunk.choices[0].delta.content)
                    if len(pieces) == 3:
                        os.killpg(supervisor.pid, signal.SIGKILL)
        assert len(pieces) >= 3 and "nothing was stored" in caught.value.message

        stored = proxy.http().get("/v1/sessions/crash").json()
        assert stored["turns"] == 1
        assert [m["content"] for m in stored["messages"] if m["role"] == "user"] == ["first"]

        _wait_restarted(supervisor)
        reply = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "third"}], max_tokens=3,
            extra_headers=sid,
        )  # fmt: skip
        assert reply.choices[0].finish_reason in ("stop", "length")
        stored = proxy.http().get("/v1/sessions/crash").json()
        users = [m["content"] for m in stored["messages"] if m["role"] == "user"]
        assert stored["turns"] == 2 and users == ["first", "third"]
        assert proxy.metric("llmup_backend_restarts") == 1
        assert proxy.metric("llmup_stream_errors_total") == 1
    finally:
        proxy.stop()
        supervisor.stop()


# ---- issue 19, finding 2: only a request that crashed the backend itself is refused ------


def _slow_model(folder: Path) -> Path:
    """Wider than the tiny model, so a 440-token stream lasts long enough (a second or more
    on one thread) to be at the backend when it is killed, however fast the proxy relays."""
    folder.mkdir(parents=True, exist_ok=True)
    shape = {"n_layer": 6, "n_embd": 512, "n_head": 8, "n_head_kv": 8, "n_ff": 1024}
    return write_llama_gguf(folder / "slow.gguf", chat_template=TEMPLATE, **shape)


def _supervised_slot_worker(folder: Path) -> Supervisor:
    """llmup's slot worker with two sequences (two streams at once), health-checked often
    enough that a frozen backend is killed for ill health within seconds."""
    port = free_port()
    command = [
        sys.executable, "-m", "launcher.workers.llamacpp_slots.server",
        "--model", str(_slow_model(folder)), "--model-alias", MODEL,
        "--host", "127.0.0.1", "--port", str(port), "--context", "512",
        "--parallel", "2", "--threads", "1", "--no-disk-slots",
    ]  # fmt: skip
    spec = BackendSpec(
        name="llama.cpp", command=command, port=port, log_path=folder / "backend.log",
        env={"PYTHONUNBUFFERED": "1"}, model_alias=MODEL, api_key=new_backend_key(),
    )  # fmt: skip
    options = {"health_interval_s": 0.5, "health_timeout_s": 3.0, "health_failures": 2}
    return Supervisor(spec, backoff_initial=0.2, max_restarts=10, **options).start()


def _long(text: str) -> dict:
    """A request that streams for long (no end of sequence, 440 tokens)."""
    return {
        "model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 440,
        "logit_bias": NO_EOS, "stream": True,
    }  # fmt: skip


def _at_the_backend(requests: list[tuple[openai.OpenAI, dict]]) -> list:
    """Start each stream and read its first chunk: then it is being generated."""
    streams = []
    for client, body in requests:
        stream = client.chat.completions.create(**body)
        next(iter(stream))
        streams.append(stream)
    return streams


def _break(streams: list) -> None:
    for stream in streams:
        with pytest.raises(openai.APIError):
            list(stream)


def _crash(supervisor: Supervisor, requests: list[tuple[openai.OpenAI, dict]]) -> None:
    """The backend dies (SIGKILL, as a segfault would) with these requests at it."""
    restarts = supervisor.restarts
    streams = _at_the_backend(requests)
    os.killpg(supervisor.pid, signal.SIGKILL)
    _break(streams)
    _wait_restarted(supervisor, restarts + 1)


def _refused(client: openai.OpenAI, body: dict) -> bool:
    try:
        list(client.chat.completions.create(**body))
    except openai.BadRequestError as exc:
        assert exc.code == "request_crashed_backend"
        return True
    return False


def test_only_a_request_that_crashed_the_backend_alone_or_twice_is_refused(tmp_path):
    supervisor = _supervised_slot_worker(tmp_path / "backend")
    backend = served(supervisor, WorkerKind.LLAMACPP_SLOTS, embeddings=False)
    proxy = serve_proxy(proxy_settings(tmp_path / "home", api_keys=["ka", "kb"]), backend)
    a, b = proxy.client("ka"), proxy.client("kb")
    try:
        alone, x, y, z = _long("alone"), _long("ex"), _long("why"), _long("zed")
        _crash(supervisor, [(a, alone)])  # the only request at the backend: the culprit
        assert _refused(a, alone)
        assert not _refused(b, alone)  # the same body from another key is not A's request

        _crash(supervisor, [(a, x), (b, y)])  # two at the backend: neither is blamed yet
        assert not _refused(b, y)
        _crash(supervisor, [(a, x), (b, z)])  # x at a second crash: now it is
        assert _refused(a, x)
        assert not _refused(b, z) and not _refused(b, y)
        assert supervisor.unhealthy_kills == 0
    finally:
        proxy.stop()
        supervisor.stop()


def test_nothing_is_held_against_requests_caught_in_an_unhealthy_kill(tmp_path):
    """The backend hangs (SIGSTOP) with one request at it; the supervisor kills it for ill
    health. That request did not crash anything: sent again unchanged, it is answered."""
    supervisor = _supervised_slot_worker(tmp_path / "backend")
    proxy = serve_proxy(proxy_settings(tmp_path / "home"), served(supervisor))
    client = proxy.client()
    try:
        body = _long("frozen")
        streams = _at_the_backend([(client, body)])
        os.killpg(supervisor.pid, signal.SIGSTOP)
        _break(streams)  # ends when the supervisor kills the frozen backend
        _wait_restarted(supervisor, 1)
        assert supervisor.unhealthy_kills == 1
        assert not _refused(client, body)
    finally:
        proxy.stop()
        supervisor.stop()


def test_crash_memory_counts_each_crash_once_and_skips_ordered_stops():
    stops = [0]
    memory = CrashMemory(ordered_stops=lambda: stops[0])
    with memory.inflight("o", "d") as one, memory.inflight("o", "d") as copy:
        memory.backend_dropped(one)
        memory.backend_dropped(copy)  # the same crash, seen by its second request
    assert len(memory) == 1  # two copies of one request were all that was at the backend
    with memory.inflight("o", "e") as first, memory.inflight("p", "f") as second:
        memory.backend_dropped(first)
        memory.backend_dropped(second)
    with memory.inflight("o", "e") as again, memory.inflight("q", "g"):
        stops[0] += 1  # the supervisor stops the backend: nobody is blamed
        memory.backend_dropped(again)
    assert len(memory) == 1
    memory.refuse_known("o", "e")  # a crash and an ordered stop are not two crashes
    with pytest.raises(BadRequestError):
        memory.refuse_known("o", "d")
