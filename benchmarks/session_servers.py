"""The servers benchmarks/session_turns.py compares, each started and stopped the same way.

- `llmup`: `llmup serve --model-file M --parallel 4` (llmup's session-slot worker behind the
  proxy; sessions named by X-Session-Id, the proxy keeps the history).
- `llama-server`: llama.cpp's own server built from the llama.cpp vendored in the installed
  llama-cpp-python (benchmarks/build_llama_server.sh), `-np 4`, same threads and context per
  slot; the client resends the history each turn, llama-server reuses its slot caches.
- `llmup-stock`: `llmup serve --llamacpp-impl server` (llama-cpp-python's server behind the
  proxy, which re-sends the whole history every turn).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
BUILD_SCRIPT = ROOT / "benchmarks" / "build_llama_server.sh"


@dataclass
class Arm:
    """One running server: its OpenAI base URL, whether it keeps sessions itself (then only
    the new message is sent, with X-Session-Id), and the process that holds the model."""

    name: str
    url: str
    proc: subprocess.Popen
    sessions: bool
    model: str
    home: tempfile.TemporaryDirectory | None = None
    extra: dict = field(default_factory=dict)

    def backend_rss(self) -> int:
        """Resident bytes of the process holding the model (the worker under llmup)."""
        root = psutil.Process(self.proc.pid)
        workers = [
            p for p in root.children(recursive=True) if "launcher.workers" in " ".join(p.cmdline())
        ]
        return (workers[0] if workers else root).memory_info().rss

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.home is not None:
            self.home.cleanup()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(proc: subprocess.Popen, url: str, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{url} exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"{url} not ready in {timeout} s")


def start_llmup(
    model: Path, *, context: int, impl: str, parallel: int, flash_attn: str | None = None
) -> Arm:
    home = tempfile.TemporaryDirectory(prefix="llmup-bench-")
    port = free_port()
    log = Path(home.name) / "serve.log"
    command = [
        sys.executable, "-m", "launcher", "serve", "--model-file", str(model),
        "--context", str(context), "--llamacpp-impl", impl, "--port", str(port), "--quiet",
    ]  # fmt: skip
    if flash_attn is not None:  # else the plan's default
        command += ["--flash-attn", flash_attn]
    if impl == "slots":
        command += ["--parallel", str(parallel)]
    env = {**os.environ, "LLMUP_HOME": home.name}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    wait_ready(proc, url, log)
    name = "llmup" if impl == "slots" else "llmup-stock"
    plan = httpx.get(url + "/v1/plan", timeout=10).json()["plan"]
    # what the plan accounts for in RAM: the model's need plus the saved-session store
    bound = plan["memory_mib"]["total"] + plan["settings"].get("slot_ram_mib", 0)
    extra = {"planned_ram_mib": bound, "parallel": plan["parallel"]}
    return Arm(name, url, proc, sessions=True, model=model.stem, home=home, extra=extra)


def llama_server_binary() -> Path | None:
    """The cached build (benchmarks/build_llama_server.sh), None when it was not built."""
    env = {**os.environ, "PYTHON": sys.executable}
    out = subprocess.run(
        ["bash", str(BUILD_SCRIPT), "--path-only"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    ).stdout.strip()
    return Path(out) if out and Path(out).is_file() else None


def start_llama_server(
    binary: Path,
    model: Path,
    *,
    context: int,
    parallel: int,
    threads: int,
    flash_attn: str = "auto",
) -> Arm:
    home = tempfile.TemporaryDirectory(prefix="llama-server-bench-")
    port = free_port()
    log = Path(home.name) / "server.log"
    command = [
        str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
        "-c", str(context * parallel), "-np", str(parallel), "-t", str(threads),
        "-tb", str(threads), "--no-webui", "-fa", flash_attn,
    ]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    wait_ready(proc, url, log)
    return Arm("llama-server", url, proc, sessions=False, model=model.stem, home=home)
