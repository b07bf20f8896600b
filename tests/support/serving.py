"""`llmup serve` as a user runs it: a subprocess in its own process group, output captured."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import ClassVar

import httpx
import openai
import psutil

from launcher.netaddr import http_url

# Health checks fast enough for a test to see a hung backend replaced within seconds.
FAST_HEALTH = {
    "LLMUP_SERVE__HEALTH_INTERVAL_S": "0.5",
    "LLMUP_SERVE__HEALTH_TIMEOUT_S": "2",
    "LLMUP_SERVE__HEALTH_FAILURES": "3",
}


class Served:
    """`llmup serve` in a subprocess of its own process group, with its output captured.

    Every instance is remembered so that `kill_leftovers()` (run after each test by conftest)
    can stop those the test started: one that fails before its own stop never leaves a
    server generating behind it.
    """

    started: ClassVar[list[Served]] = []

    def __init__(
        self,
        args: list[str],
        home: Path,
        port: int,
        env: dict[str, str] | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.port, self.home = port, home
        self.log = open(home / "serve.out", "w+")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, "LLMUP_HOME": str(home), "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "launcher", "serve", *args, "--port", str(port), "--quiet"],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        self.url = http_url(host, port)
        Served.started.append(self)

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.output()
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise AssertionError("not ready in time:\n" + self.output())

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()

    def backend(self) -> psutil.Process:
        kids = psutil.Process(self.proc.pid).children(recursive=True)
        workers = ("launcher.workers.llamacpp_python", "launcher.workers.llamacpp_slots")
        return next(p for p in kids if any(w in " ".join(p.cmdline()) for w in workers))

    def wait_backend(self, timeout: float = 60) -> psutil.Process:
        """The backend worker process, once spawned (probes run before it are not it)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.backend()
            except (StopIteration, psutil.Error):
                assert time.monotonic() < deadline and self.proc.poll() is None, self.output()
                time.sleep(0.05)

    def client(self, key: str = "none", **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, **kw)

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=5).json()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=30)
        self.log.close()


def kill_leftovers(keep: int = 0) -> None:
    """SIGKILL every server started after the first `keep` ones, with its process group and
    every process below it: a backend runs in a process group of its own, and one a test
    froze (SIGSTOP) before it armed its parent-death signal would outlive the server."""
    for server in Served.started[keep:]:
        if server.proc.poll() is None:
            below = descendants(server.proc.pid)
            os.killpg(server.proc.pid, signal.SIGKILL)
            for proc in below:
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.kill()
            server.proc.wait(timeout=30)
        server.log.close()
    del Served.started[keep:]


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def gone(procs: list[psutil.Process], timeout: float = 15) -> bool:
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return not alive
