"""The backend supervisor with real child processes and real HTTP on 127.0.0.1.

The child is a small http.server script whose behaviour the environment picks: listen after
a delay, exit after a while, print a typical failure message and exit, leave a grandchild.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil
import pytest

from launcher.backends.spec import BackendSpec
from launcher.backends.supervise.failure import classify_failure
from launcher.backends.supervise.supervisor import Progress, State, Supervisor
from launcher.errors import BackendCrashError, BackendLoadError
from launcher.netaddr import free_port, port_is_free

REPO = Path(__file__).resolve().parents[2]

CHILD = r"""
import http.server, os, signal, subprocess, sys, threading, time

port = int(sys.argv[1])
env = os.environ.get
print("child starting", os.getpid(), "LEAKED=" + env("LEAKED", "-"), "ADDED=" + env("ADDED", "-"))
if env("CHILD_FAIL") is not None:
    print(env("CHILD_FAIL"), file=sys.stderr)
    sys.exit(int(env("CHILD_CODE", "1")))
if env("CHILD_SELFKILL"):
    os.kill(os.getpid(), signal.SIGKILL)
if env("CHILD_GRANDCHILD"):
    grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    print("grandchild", grandchild.pid)
time.sleep(float(env("CHILD_DELAY", "0")))
if env("CHILD_EXIT_AFTER"):
    threading.Timer(float(env("CHILD_EXIT_AFTER")), lambda: os._exit(3)).start()
sick_at = time.monotonic() + float(env("CHILD_SICK_AFTER", "inf"))
if env("CHILD_PDEATHSIG"):
    import ctypes
    sig = ctypes.c_int(0)
    ctypes.CDLL(None).prctl(2, ctypes.byref(sig), 0, 0, 0)  # PR_GET_PDEATHSIG
    print("pdeathsig", sig.value)


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b'{"ok": true}'
        if self.path == "/health" and time.monotonic() > sick_at:
            self.send_response(503)  # like the exllamav2 worker after a CUDA fault
        else:
            self.send_response(200 if self.path == "/health" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


print("listening on", port)
http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()
"""

PARENT = r"""
import sys, time
from pathlib import Path
from launcher.backends.spec import BackendSpec
from launcher.backends.supervise.supervisor import Supervisor

script, port, log_path = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
spec = BackendSpec(name="child", command=[sys.executable, "-u", script, str(port)],
                   port=port, health_path="/health", log_path=log_path)
sup = Supervisor(spec).start()
print(sup.pid, flush=True)
time.sleep(600)
"""


def log_dir() -> Path:
    return Path(os.environ["LLMUP_HOME"]) / "logs"


@pytest.fixture
def child_script(tmp_path: Path) -> Path:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    return script


@pytest.fixture
def make_spec(child_script: Path) -> Callable[..., BackendSpec]:
    def make(env: dict[str, str] | None = None, **kw) -> BackendSpec:
        port = kw.pop("port", None) or free_port()
        kw.setdefault("ready_timeout_s", 15.0)
        return BackendSpec(
            name="test-child",
            command=[sys.executable, "-u", str(child_script), str(port)],
            env=env or {},
            port=port,
            health_path="/health",
            log_path=log_dir() / "child.log",
            **kw,
        )

    return make


def wait_until(cond: Callable[[], bool], timeout: float = 15.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(interval)
    return cond()


def gone(pid: int) -> bool:
    """The process no longer runs (a zombie waiting for init to reap it counts as gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def group_alive(pgid: int) -> list[int]:
    alive = []
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                alive.append(proc.pid)
        except (ProcessLookupError, psutil.Error):
            continue
    return alive


def healthy(sup: Supervisor) -> bool:
    try:
        return httpx.get(sup.base_url + "/health", timeout=2, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


def logged_pid(log_path: Path, word: str) -> int:
    for line in reversed(log_path.read_text().splitlines()):
        if line.startswith(word + " "):
            return int(line.split()[-1])
    raise AssertionError(f"no {word!r} line in {log_path}")


def test_ready_then_stop_leaves_no_process(make_spec):
    sup = Supervisor(make_spec({"CHILD_GRANDCHILD": "1"})).start()
    assert sup.state is State.READY
    assert healthy(sup)
    pid = sup.pid
    assert pid is not None and os.getpgid(pid) == pid  # its own process group
    grandchild = logged_pid(sup.log_path, "grandchild")
    assert set(group_alive(pid)) == {pid, grandchild}
    sup.stop()
    assert sup.state is State.STOPPED and sup.pid is None
    assert wait_until(lambda: gone(pid) and gone(grandchild))
    assert group_alive(pid) == []
    text = sup.log_path.read_text()
    assert "==== llmup: test-child attempt 1" in text and "listening on" in text
    sup.stop()  # idempotent


def test_context_manager_progress_and_start_once(make_spec):
    seen: list[Progress] = []
    spec = make_spec({"CHILD_DELAY": "1.2"})
    with Supervisor(spec, progress=seen.append, progress_interval_s=0.2) as sup:
        assert sup.state is State.READY
        pid = sup.pid
        with pytest.raises(RuntimeError):
            sup.start()
    assert wait_until(lambda: gone(pid))
    assert len(seen) >= 3
    assert all(p.attempt == 1 and p.timeout_s == 15.0 for p in seen)
    assert seen[-1].elapsed_s > seen[0].elapsed_s
    assert any(p.last_line.startswith("child starting") for p in seen)


def test_child_environment_drops_and_adds(make_spec, monkeypatch):
    monkeypatch.setenv("LEAKED", "secret")
    spec = make_spec({"ADDED": "yes"}, env_unset=frozenset({"leaked"}))
    with Supervisor(spec) as sup:
        first = sup.attempt_log().splitlines()[0]
    assert "LEAKED=-" in first and "ADDED=yes" in first


def test_crash_restarts_with_exponential_backoff(make_spec):
    with Supervisor(make_spec(), backoff_initial=0.4, max_restarts=5) as sup:
        delays = []
        for n in (1, 2):
            old = sup.pid
            killed_at = time.monotonic()
            os.kill(old, signal.SIGKILL)
            assert wait_until(lambda: sup.state is State.RESTARTING, 5, 0.01)
            assert sup.wait_ready(15)
            delays.append(time.monotonic() - killed_at)
            assert sup.restarts == n and sup.pid not in (None, old)
            assert gone(old) and healthy(sup)
        assert delays[0] >= 0.4 and delays[1] >= 0.8  # 0.4 s, then doubled
        assert "attempt 3" in sup.log_path.read_text()


def test_bounded_restarts_end_in_failure(make_spec):
    spec = make_spec({"CHILD_EXIT_AFTER": "0.3"})
    failures: list[Exception] = []
    sup = Supervisor(spec, max_restarts=2, backoff_initial=0.05, on_failure=failures.append)
    try:
        sup.start()
        assert wait_until(lambda: sup.state is State.FAILED, 20)
        assert sup.restarts == 2
        assert isinstance(sup.failure, BackendCrashError) and failures == [sup.failure]
        message = str(sup.failure)
        assert "failed 3 times within 600 s" in message and "exit code 3" in message
        assert str(sup.log_path) in message and "listening on" in message
        assert "\n" not in message  # serve prints it as its one last line
        with pytest.raises(BackendCrashError):
            sup.wait_ready(1)
        assert sup.pid is None
    finally:
        sup.stop()


def test_the_restart_budget_is_a_rate(make_spec):
    """Crashes further apart than the window never add up: one crash per window is fine."""
    spec = make_spec({"CHILD_EXIT_AFTER": "0.6"})
    with Supervisor(spec, max_restarts=1, backoff_initial=0.05, restart_window_s=0.5) as sup:
        assert wait_until(lambda: sup.restarts >= 3, 30)
        assert sup.state is not State.FAILED


def test_started_from_a_short_lived_thread_the_child_survives_it(make_spec):
    """The parent-death signal follows the forking thread; the monitor thread forks."""
    sup = Supervisor(make_spec())
    starter = threading.Thread(target=sup.start)
    starter.start()
    starter.join(20)
    try:
        assert sup.state is State.READY
        time.sleep(0.5)
        assert healthy(sup) and sup.restarts == 0
    finally:
        sup.stop()


def test_a_sick_child_is_restarted_after_failed_health_checks(make_spec):
    """/health turning 503 after ready: killed after 2 failed polls and started again."""
    spec = make_spec({"CHILD_SICK_AFTER": "1.0"})
    options = dict(health_interval_s=0.2, health_timeout_s=1.0, health_failures=2)
    with Supervisor(spec, backoff_initial=0.05, **options) as sup:
        first = sup.pid
        assert wait_until(lambda: sup.pid not in (None, first) and sup.state is State.READY, 20)
        assert gone(first) and sup.restarts >= 1
        seen = sup.supervision
        assert seen["failed_health_checks"] >= 2 and seen["unhealthy_restarts"] >= 1
        assert "stopped after 2 failed health checks (HTTP 503)" in sup.log_path.read_text()


def test_a_hung_child_is_restarted(make_spec):
    """A child that stops answering (SIGSTOP: alive, silent) is killed and replaced."""
    options = dict(health_interval_s=0.2, health_timeout_s=1.5, health_failures=2)
    with Supervisor(make_spec(), backoff_initial=0.05, **options) as sup:
        first = sup.pid
        os.kill(first, signal.SIGSTOP)
        assert wait_until(lambda: sup.pid not in (None, first) and sup.state is State.READY, 20)
        assert gone(first) and sup.unhealthy_kills == 1
        assert sup.supervision["last_problem"] is None  # the new child is healthy


def test_the_child_arms_the_parent_death_signal_itself(make_spec, monkeypatch):
    """No preexec_fn (unsafe when forking from a thread): the child runs prctl itself."""
    from launcher.backends.supervise import supervisor as supervisor_module

    seen: list[dict] = []
    real_popen = subprocess.Popen

    def popen(*args, **kwargs):
        seen.append(kwargs)
        return real_popen(*args, **kwargs)

    monkeypatch.setattr(supervisor_module.subprocess, "Popen", popen)
    with Supervisor(make_spec({"CHILD_PDEATHSIG": "1"})) as sup:
        assert f"pdeathsig {int(signal.SIGKILL)}" in sup.attempt_log()
        assert psutil.Process(sup.pid).cmdline()[-2:] == sup.spec.command[-2:]  # exec'd
    assert seen and all(kw.get("preexec_fn") is None for kw in seen)


def _read_line(stream, timeout: float) -> str:
    ready, _, _ = select.select([stream], [], [], timeout)
    assert ready, "the parent printed nothing"
    return stream.readline()


def test_sigkilled_parent_leaves_no_orphan(child_script, tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    port = free_port()
    parent = subprocess.Popen(
        [sys.executable, str(script), str(child_script), str(port), str(tmp_path / "p.log")],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        child = int(_read_line(parent.stdout, 30))
        assert psutil.Process(child).ppid() == parent.pid
        assert not gone(child)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        assert wait_until(lambda: gone(child), 10)
        assert wait_until(lambda: port_is_free("127.0.0.1", port), 10)
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()


OOM_CUDA = (
    "ggml_backend_cuda_buffer_type_alloc_buffer: allocating 9000.00 MiB on device 0: "
    "cudaMalloc failed: out of memory\n"
    "alloc_tensor_range: failed to allocate CUDA0 buffer of size 9437184000\n"
    "llama_model_load: error loading model: unable to allocate CUDA0 buffer\n"
    "llama_model_load_from_file_impl: failed to load model\n"
    "ValueError: Failed to load model from file: /models/llama-2-70b.gguf"
)
BAD_MAGIC = (
    "gguf_init_from_reader: invalid magic characters: 'eV??', expected 'GGUF'\n"
    "llama_model_load: error loading model: llama_model_loader: failed to load model from x\n"
    "ValueError: Failed to load model from file: x"
)
MISSING = (
    "Traceback (most recent call last):\n"
    '  File "<frozen runpy>", line 189, in _run_module_as_main\n'
    "ModuleNotFoundError: No module named 'sse_starlette'"
)


@pytest.mark.parametrize(
    ("message", "code", "kind", "line"),
    [
        (OOM_CUDA, 1, "out_of_memory", "cudaMalloc failed: out of memory"),
        (
            "ggml_backend_cpu_buffer_type_alloc_buffer: failed to allocate buffer of size 7e10",
            1,
            "out_of_memory",
            "failed to allocate buffer",
        ),
        ("Killed", 137, "out_of_memory", "Killed"),
        (BAD_MAGIC, 1, "corrupt_model", "invalid magic characters"),
        (
            "llama_model_load: error loading model: unknown model architecture: 'mamba9'",
            1,
            "corrupt_model",
            "unknown model architecture",
        ),
        (MISSING, 1, "missing_dependency", "No module named 'sse_starlette'"),
        (
            "ERROR:    [Errno 98] error while attempting to bind on address "
            "('127.0.0.1', 8000): address already in use",
            3,
            "port_in_use",
            "address already in use",
        ),
        (
            "warning: failed to mlock 4096-byte buffer: Cannot allocate memory\nRuntimeError: boom",
            1,
            "unknown",
            "RuntimeError: boom",
        ),
    ],
)
def test_load_failure_is_classified(make_spec, message, code, kind, line):
    spec = make_spec({"CHILD_FAIL": message, "CHILD_CODE": str(code)})
    sup = Supervisor(spec)
    with pytest.raises(BackendLoadError) as err:
        sup.start()
    assert err.value.kind == kind
    assert line in err.value.line and line in str(err.value)
    assert err.value.returncode == code
    assert str(spec.log_path) in str(err.value) and err.value.log_path == str(spec.log_path)
    assert sup.state is State.FAILED and sup.restarts == 0 and sup.pid is None
    sup.stop()


def test_sigkill_during_load_reads_as_out_of_memory(make_spec):
    with pytest.raises(BackendLoadError) as err:
        Supervisor(make_spec({"CHILD_SELFKILL": "1"})).start()
    assert err.value.kind == "out_of_memory" and err.value.returncode == -9
    assert "SIGKILL" in err.value.line


def test_port_already_in_use_is_refused_before_start(make_spec):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        spec = make_spec(port=busy.getsockname()[1])
        with pytest.raises(BackendLoadError) as err:
            Supervisor(spec).start()
    assert err.value.kind == "port_in_use"
    assert f"127.0.0.1:{spec.port}" in str(err.value)
    assert not spec.log_path.exists() or "attempt" not in spec.log_path.read_text()


def test_not_ready_in_time_is_a_timeout_and_kills_the_child(make_spec):
    spec = make_spec({"CHILD_DELAY": "60"}, ready_timeout_s=1.0)
    sup = Supervisor(spec)
    with pytest.raises(BackendLoadError) as err:
        sup.start()
    assert err.value.kind == "timeout"
    pid = int(sup.attempt_log().split()[2])
    assert wait_until(lambda: gone(pid), 5)


def test_missing_command_is_a_missing_dependency(tmp_path):
    spec = BackendSpec(
        name="nothing",
        command=[str(tmp_path / "no-such-binary")],
        port=free_port(),
        log_path=log_dir() / "nothing.log",
    )
    with pytest.raises(BackendLoadError) as err:
        Supervisor(spec).start()
    assert err.value.kind == "missing_dependency"


def test_classify_failure_prefers_the_root_cause():
    assert classify_failure(OOM_CUDA)[0] == "out_of_memory"
    normal_load_then_boom = "llama_model_loader: loaded meta data (version GGUF V3)\nboom"
    assert classify_failure(normal_load_then_boom) == ("unknown", "boom")
    assert classify_failure("", -9)[0] == "out_of_memory"
    assert classify_failure("", 1) == ("unknown", "exit code 1 and no output")
