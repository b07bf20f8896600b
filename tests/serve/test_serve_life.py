"""`llmup serve` as systemd or docker runs it: stops that stop, failures that exit, addresses
and keys checked before anything loads, a backend nobody else can call."""

from __future__ import annotations

import json
import signal
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
from conftest import run_cli
from support.backend_fixtures import NO_EOS
from support.ggufgen import write_llama_gguf
from support.serving import FAST_HEALTH, Served, descendants, gone

from launcher.netaddr import free_port
from launcher.runkey import KEY_ENV

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
LONG_CONTEXT = 65536


@pytest.fixture(scope="module")
def long_model(tmp_path_factory) -> Path:
    """A tiny model with a 64k context: a generation that bans EOS runs for many minutes."""
    folder = tmp_path_factory.mktemp("model")
    return write_llama_gguf(
        folder / "tiny-chat.gguf", n_ctx_train=LONG_CONTEXT, chat_template=TEMPLATE
    )


def backend_port(backend: psutil.Process) -> int:
    args = backend.cmdline()
    return int(args[args.index("--port") + 1])


def test_the_supervisor_giving_up_ends_serve_with_one_line(long_model, tmp_path):
    """With no restart budget left, serve exits non-zero (so systemd's Restart=on-failure or
    docker's restart policy can act) and says why in one line."""
    env = {"LLMUP_SERVE__MAX_RESTARTS": "0"}
    server = Served(["--model-file", str(long_model)], tmp_path, free_port(), env=env)
    try:
        server.wait_ready()
        server.backend().kill()
        code = server.proc.wait(timeout=30)
        out = server.output().strip().splitlines()
    finally:
        server.stop()
    assert code == 1, out
    assert out[-1].startswith("error: the llama.cpp backend failed once within 600 s"), out
    assert "killed by SIGKILL" in out[-1] and "log: " in out[-1]
    assert "Traceback" not in "\n".join(out)


def _stream(url: str, seen: list[str], events: list[str]) -> None:
    body = {
        "model": "tiny-chat",
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": LONG_CONTEXT - 100,
        "logit_bias": NO_EOS,
        "stream": True,
    }
    headers = {"X-Session-Id": "runaway"}
    try:
        with httpx.stream(
            "POST", url + "/v1/chat/completions", json=body, headers=headers, timeout=120
        ) as reply:
            for line in reply.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    seen.append(time.monotonic())
    except httpx.HTTPError as exc:
        events.append(f"transport error: {exc!r}")


def _complete(url: str, results: list) -> None:
    body = {"model": "tiny-chat", "prompt": "hello", "max_tokens": 60000, "logit_bias": NO_EOS}
    try:
        results.append(httpx.post(url + "/v1/completions", json=body, timeout=120))
    except httpx.HTTPError as exc:
        results.append(exc)


def test_sigterm_stops_a_runaway_generation_within_10_s(long_model, tmp_path):
    """A stream whose EOS is banned (minutes of work left) and a request queued behind it:
    SIGTERM ends serve within 10 s, the stream with an error event, the queued request with
    an error reply, the backend with it, and the session store closes cleanly."""
    args = ["--model-file", str(long_model), "--context", str(LONG_CONTEXT)]
    server = Served(args, tmp_path, free_port(), env=FAST_HEALTH)
    server.wait_ready()
    children = descendants(server.proc.pid)
    seen: list[float] = []
    events: list[str] = []
    results: list = []
    threads = [
        threading.Thread(target=_stream, args=(server.url, seen, events)),
        threading.Thread(target=_complete, args=(server.url, results)),
    ]
    for thread in threads:
        thread.start()
        time.sleep(0.5)
    deadline = time.monotonic() + 60
    while not (seen and seen[-1] - seen[0] > 3) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(seen) >= 10, server.output()
    rate = (len(seen) - 1) / (seen[-1] - seen[0])  # over 3 s: events may come in bursts
    # llmup's slot worker decodes the tiny model at ~1200 tokens/s: still far past the 10 s
    assert (LONG_CONTEXT - 100) / rate > 30, f"{rate:.0f} tokens/s would finish within 30 s"
    busy = server.health()["backend"]  # polled every 0.5 s while generating: busy, not hung
    assert busy["failed_health_checks"] == 0 and busy["restarts"] == 0, busy
    started = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    code = server.proc.wait(timeout=30)
    took = time.monotonic() - started
    for thread in threads:
        thread.join(30)
    server.log.close()
    assert took < 10, f"serve took {took:.1f} s to stop:\n{server.output()}"
    assert code != 0 and gone(children, timeout=5)
    assert "error" in json.loads(events[-1]), events[-3:]
    assert isinstance(results[0], httpx.Response) and results[0].status_code >= 500, results
    assert "error" in results[0].json()
    db = tmp_path / "sessions.sqlite3"
    assert not Path(f"{db}-wal").exists()  # the last connection closed: WAL checkpointed
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_sigterm_while_the_backend_loads_stops_at_once(long_model, tmp_path):
    args = ["--model-file", str(long_model), "--context", str(LONG_CONTEXT)]
    server = Served(args, tmp_path, free_port())
    server.wait_backend()
    children = descendants(server.proc.pid)
    health = httpx.get(server.url + "/health", timeout=5)  # the port answers while loading
    assert health.status_code == 503 and health.json()["status"] == "loading"
    started = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    code = server.proc.wait(timeout=30)
    assert time.monotonic() - started < 10 and code != 0
    assert gone(children, timeout=5)
    server.log.close()


def test_ipv6_keys_never_printed_and_the_backend_refuses_strangers(long_model, tmp_path):
    key = "k-" + "7" * 30
    args = ["--model-file", str(long_model), "--host", "::1", "--api-key", key]
    server = Served(args, tmp_path, free_port(), host="::1")
    try:
        server.wait_ready()
        assert server.url.startswith("http://[::1]:")
        reply = server.client(key).completions.create(model="tiny-chat", prompt="hi", max_tokens=2)
        assert reply.choices[0].text is not None
        out = server.output()
        assert f"ready: tiny-chat at {server.url}/v1" in out
        assert key not in out and 'Bearer $LLMUP_API_KEY"' in out and "'$LLMUP_API_KEY'" in out
        backend = server.backend()
        direct = f"http://127.0.0.1:{backend_port(backend)}"
        assert httpx.get(direct + "/v1/models", timeout=5).status_code == 401
        wrong = {"Authorization": f"Bearer {key}"}  # the proxy's key is not the backend's
        assert httpx.get(direct + "/v1/models", headers=wrong, timeout=5).status_code == 401
        assert httpx.get(direct + "/health", timeout=5).status_code == 401
        assert not any(KEY_ENV in a or key in a for a in backend.cmdline())
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--host", "203.0.113.7", "--api-key", "k"], "cannot listen on 203.0.113.7"),
        (
            ["--host", "no-such-host.invalid", "--api-key", "k"],
            "cannot listen on 'no-such-host.invalid'",
        ),
        (["--api-key", " "], "empty or only whitespace"),
        (["--api-key", "key "], "starts or ends with whitespace"),
    ],
)
def test_bind_and_key_problems_are_one_line_before_planning(args, needle):
    """A missing model file would be the next error: the bind comes first."""
    res = run_cli("serve", "--model-file", "/nonexistent.gguf", *args, "--port", str(free_port()))
    assert res.returncode == 2, res.stderr
    assert needle in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert res.stdout == ""  # not even the plan was printed
