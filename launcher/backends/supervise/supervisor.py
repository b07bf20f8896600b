"""Run one backend as a supervised child: a local process, or a container.

The supervisor starts the spec's command through a runtime (supervise/process.py: a local
process group by default; supervise/container.py: a docker container), appends its output to a
log file, waits until the health URL answers, and then keeps watching: it polls the health URL
while the child runs, and a child that exits, or fails `health_failures` polls in a row (it
answers 503, or it hangs and answers nothing), is stopped and restarted with exponential
backoff. The restart budget is a rate: more than `max_restarts` crashes within
`restart_window_s` and it gives up (state FAILED, `on_failure` called), so a crash a week
never exhausts it but a crash loop ends. `stop()` takes the child down (SIGTERM to the group,
wait, SIGKILL; docker stop for a container) without leaving a process behind, also when the
supervising process itself is killed (a local child arms the Linux parent-death signal itself:
`deathsig`; a container left behind is removed by the next llmup that starts one).

Health polls and every other call to the backend carry the spec's per-run key.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import httpx

from launcher.backends.spec import BackendSpec
from launcher.backends.supervise.failure import (
    KIND_TEXT,
    OWN_LINE,
    classify_failure,
    exit_text,
    load_error,
)
from launcher.backends.supervise.logfile import prepare_log, spawn_logged
from launcher.backends.supervise.process import Child, LocalRuntime, Runtime, SpawnError
from launcher.errors import BackendCrashError, BackendError, BackendLoadError
from launcher.netaddr import accepts, port_is_free
from launcher.private import open_private

log = logging.getLogger(__name__)

UNHEALTHY_GRACE_S = 2.0  # a sick child gets this long after SIGTERM before SIGKILL


class State(str, Enum):
    STARTING = "starting"
    READY = "ready"
    RESTARTING = "restarting"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclass(frozen=True)
class Progress:
    """How far a loading backend got, for a progress line ("loading... 12 s")."""

    attempt: int
    elapsed_s: float
    timeout_s: float
    last_line: str


ProgressFn = Callable[[Progress], None]


def health_problem(client: httpx.Client, url: str) -> str | None:
    """None when the health URL answers 200, else what went wrong, in a few words."""
    try:
        status = client.get(url).status_code
    except httpx.TimeoutException:
        return "no answer in time"
    except httpx.HTTPError as exc:
        return type(exc).__name__
    return None if status == 200 else f"HTTP {status}"


class Supervisor:
    """One backend child: start and wait until ready, watch, restart, stop cleanly.

    The child runs where `runtime` puts it: a local process group by default, a container
    with the docker runtime; the supervision is the same.

    The progress callback runs on the monitor thread about once a second while a child
    loads; `on_failure` runs there once, when the supervisor gives up after start().
    `adopted` is a child already spawned for this spec (`headstart`): the first attempt
    waits for it; a restart spawns as usual.
    """

    def __init__(
        self,
        spec: BackendSpec,
        *,
        max_restarts: int = 5,
        restart_window_s: float = 600.0,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        health_interval_s: float = 5.0,
        health_timeout_s: float = 5.0,
        health_failures: int = 3,
        stop_timeout_s: float = 10.0,
        poll_interval_s: float = 0.01,  # the start waits on it: every 0.1 s cost ~50 ms
        progress: ProgressFn | None = None,
        progress_interval_s: float = 1.0,
        on_failure: Callable[[BackendError], None] | None = None,
        runtime: Runtime | None = None,
        adopted: tuple[Child, int] | None = None,
    ) -> None:
        self.spec = spec
        self.runtime = runtime if runtime is not None else LocalRuntime()
        self.max_restarts = max_restarts
        self.restart_window_s = restart_window_s
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.health_interval_s = health_interval_s
        self.health_timeout_s = health_timeout_s
        self.health_failures = health_failures
        self.stop_timeout_s = stop_timeout_s
        self.poll_interval_s = poll_interval_s
        self.progress = progress
        self.progress_interval_s = progress_interval_s
        self.on_failure = on_failure
        self.restarts = 0
        self.failed_health_checks = 0
        self.unhealthy_kills = 0
        # stops of a running child that the supervisor chose (unhealthy kills, stop()), counted
        # before the signal: a request whose connection then drops did not crash the backend
        self.ordered_stops = 0
        self.last_problem: str | None = None
        self.failure: BackendError | None = None
        self._state = State.STOPPED
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self._settled = threading.Event()
        self._proc: Child | None = None
        self._thread: threading.Thread | None = None
        self._attempt = 0
        self._log_offset = 0
        self._ready_at: float | None = None
        self._crashes: collections.deque[float] = collections.deque()
        self._launch_failure: BackendLoadError | None = None
        self._serving = False  # start() returned: a later failure goes to on_failure
        # a child a head start spawned for this very spec before the supervisor existed, and
        # where its output starts in the log: the first attempt waits for it, spawns nothing
        self._adopted = adopted

    # ----- what callers see

    @property
    def state(self) -> State:
        return self._state

    @property
    def pid(self) -> int | None:
        """The running child's pid (a local child's is also its process group id; a
        container's is its init process on the host), None between children."""
        proc = self._proc
        return proc.pid if proc is not None and proc.returncode is None else None

    @property
    def base_url(self) -> str:
        return self.spec.base_url

    @property
    def auth_headers(self) -> dict[str, str]:
        """The headers every call to the backend needs (its per-run key)."""
        return self.spec.auth_headers

    @property
    def log_path(self) -> Path:
        return self.spec.log_path

    @property
    def supervision(self) -> dict[str, Any]:
        """What /health and /metrics show of the supervision."""
        return {
            "state": self._state.value,
            "restarts": self.restarts,
            "failed_health_checks": self.failed_health_checks,
            "unhealthy_restarts": self.unhealthy_kills,
            "last_problem": self.last_problem,
        }

    def __enter__(self) -> Supervisor:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self, *, while_loading: Callable[[], None] | None = None) -> Supervisor:
        """Start the child and block until it is ready; BackendLoadError if it is not.
        `while_loading` runs on the calling thread once the child is on its way, before the
        wait (what the caller can prepare meanwhile, e.g. the proxy's app)."""
        if self._thread is not None:
            raise RuntimeError("a Supervisor starts once; build a new one to start again")
        if self._adopted is None:  # a head start prepared the log when it spawned
            prepare_log(self.spec.log_path)
        self._set_state(State.STARTING)
        self._thread = threading.Thread(
            target=self._run, name=f"supervisor-{self.spec.name}", daemon=True
        )
        self._thread.start()
        try:
            if while_loading is not None:
                while_loading()
            self._settled.wait()
        except BaseException:  # Ctrl-C or SIGTERM while loading still takes the child down
            self.stop()
            raise
        if self.failure is not None:
            raise self.failure
        return self

    def wait_ready(self, timeout: float) -> bool:
        """Block until the child is ready (True), or timeout (False); raise if it failed."""
        settled = (State.READY, State.FAILED, State.STOPPED)
        with self._changed:
            self._changed.wait_for(lambda: self._state in settled, timeout)
        if self._state is State.FAILED and self.failure is not None:
            raise self.failure
        return self._state is State.READY

    def stop(self, grace_s: float | None = None) -> None:
        """SIGTERM the child's group, wait (grace_s, default stop_timeout_s), SIGKILL; no
        restart follows. Idempotent, and safe from any thread."""
        self._stopping.set()
        grace = self.stop_timeout_s if grace_s is None else grace_s
        with self._lock:
            proc = self._proc
        if proc is not None:
            self.ordered_stops += 1
            proc.stop(grace)
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(grace + 5)
        if self._state is not State.FAILED:
            self._set_state(State.STOPPED)
        self._settled.set()

    def attempt_log(self) -> str:
        """The output of the current (or last) child only: from its start banner on."""
        try:
            with open(self.spec.log_path, "rb") as f:
                f.seek(self._log_offset)
                return f.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    # ----- the monitor thread

    def _run(self) -> None:
        failure = self._launch()
        if failure is not None:
            self._fail(failure)
            return
        self._serving = True
        self._settled.set()
        while True:
            why = self._watch()
            if why is None or self._stopping.is_set():
                return
            if self._over_budget():
                self._fail(self._gave_up(why))
                return
            self._set_state(State.RESTARTING)
            if self._stopping.wait(self._backoff()):
                return
            self.restarts += 1
            self._launch_failure = self._launch()
            if self._launch_failure is not None and not self._stopping.is_set():
                log.warning("restart %d of %s failed: %s", self.restarts, self.spec.name,
                            self._launch_failure.line)  # fmt: skip

    def _launch(self) -> BackendLoadError | None:
        """One attempt: spawn, wait for readiness; the classified error when it fails."""
        self._attempt += 1
        self._ready_at = None
        if self._adopted is None and not port_is_free(self.spec.host, self.spec.port):
            line = f"{self.spec.host}:{self.spec.port} is already in use (checked before start)"
            return load_error(self.spec, "port_in_use", line, None)
        try:
            proc = self._spawn()
        except BackendLoadError as exc:
            return exc
        if proc is None:
            return None
        outcome = self._await_ready(proc)
        if outcome == "ready":
            self._mark_ready()
            return None
        code = proc.stop(2.0)
        if outcome == "stopped":
            return None
        if outcome == "timeout":
            line = f"no answer from {self.spec.health_url} after {self.spec.ready_timeout_s:.0f} s"
            return load_error(self.spec, "timeout", line, None)
        kind, line = classify_failure(self.attempt_log(), code)
        return load_error(self.spec, kind, line, code)

    def _spawn(self) -> Child | None:
        with self._lock:
            if self._stopping.is_set():
                return None
            if self._adopted is not None:  # the head start's child, spawned before us
                self._proc, self._log_offset = self._adopted
                self._adopted = None
                return self._proc
            try:
                self._proc, self._log_offset = spawn_logged(self.runtime, self.spec, self._attempt)
            except SpawnError as exc:
                raise load_error(self.spec, exc.kind, str(exc), None) from exc
        log.info("started %s (pid %s), log %s", self.spec.name, self._proc.pid, self.log_path)
        return self._proc

    def _log_line(self, text: str) -> None:
        """A line of llmup's own in the backend's log, where an operator reads its story."""
        with contextlib.suppress(OSError), open_private(self.spec.log_path, "a") as out:
            out.write(f"{OWN_LINE} {self.spec.name} {text}\n")

    def _client(self, timeout: float) -> httpx.Client:
        """A client for the backend's plain HTTP on loopback: no TLS, so no certificate store
        loaded (~0.16 s of CPU for the first client in a process, taken from the load)."""
        return httpx.Client(
            timeout=timeout, trust_env=False, verify=False, headers=self.spec.auth_headers
        )

    def _await_ready(self, proc: Child) -> str:
        """'ready', 'exited', 'timeout' or 'stopped', polling the health URL."""
        started = time.monotonic()
        deadline = started + self.spec.ready_timeout_s
        next_report = started + self.progress_interval_s
        with self._client(2.0) as client:
            while True:
                if self._stopping.is_set():
                    return "stopped"
                if proc.poll() is not None:
                    proc.reap()
                    return "exited"
                listening = accepts(self.spec.host, self.spec.port)  # cheap until it listens
                if listening and health_problem(client, self.spec.health_url) is None:
                    return "ready" if proc.poll() is None else "exited"
                now = time.monotonic()
                if now >= deadline:
                    return "timeout"
                if now >= next_report:
                    self._report(now - started)
                    next_report = now + self.progress_interval_s
                self._stopping.wait(self.poll_interval_s)

    def _report(self, elapsed: float) -> None:
        if self.progress is None:
            return
        progress = Progress(self._attempt, elapsed, self.spec.ready_timeout_s, self._last_line())
        try:
            self.progress(progress)
        except Exception:  # a broken progress line must not take the backend down
            log.exception("progress callback failed")

    def _last_line(self) -> str:
        text = self.attempt_log()[-4096:]
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        return lines[-1] if lines else ""

    def _mark_ready(self) -> None:
        self._ready_at = time.monotonic()
        self.last_problem = None
        self._set_state(State.READY)
        log.info("%s ready at %s (attempt %d)", self.spec.name, self.base_url, self._attempt)

    def _watch(self) -> str | None:
        """Watch a ready child until it ends; why it ended, None when stopping."""
        proc = self._proc
        if proc is None or self._ready_at is None:  # the last launch failed
            self._crashes.append(time.monotonic())
            failure = self._launch_failure
            self.last_problem = failure.line if failure is not None else "it did not start"
            return self.last_problem
        why = self._poll_until_gone(proc)
        if why is None or self._stopping.is_set():
            return None
        self._set_state(State.RESTARTING)
        proc.reap()
        uptime = time.monotonic() - self._ready_at
        log.warning("%s ended after %.1f s up: %s", self.spec.name, uptime, why)
        self._log_line(f"ended after {uptime:.1f} s up: {why}")
        self._crashes.append(time.monotonic())
        self.last_problem = why
        return why

    def _poll_until_gone(self, proc: Child) -> str | None:
        """Wait for the child to exit, polling its health in between; a child that fails
        `health_failures` polls in a row is stopped here. Why it went, None when stopping."""
        failed = 0
        with self._client(self.health_timeout_s) as client:
            while True:
                try:
                    return exit_text(proc.wait(self.health_interval_s))
                except subprocess.TimeoutExpired:
                    pass
                problem = health_problem(client, self.spec.health_url)
                if self._stopping.is_set():
                    return None
                failed = 0 if problem is None else failed + 1
                if problem is not None:
                    self._note_unhealthy(problem, failed)
                if failed >= self.health_failures:
                    self._set_state(State.RESTARTING)  # not "ready" a moment longer
                    self.unhealthy_kills += 1
                    self.ordered_stops += 1
                    code = proc.stop(UNHEALTHY_GRACE_S)
                    return f"stopped after {failed} failed health checks ({problem}); " + (
                        exit_text(code)
                    )

    def _note_unhealthy(self, problem: str, in_a_row: int) -> None:
        self.failed_health_checks += 1
        self.last_problem = f"health check: {problem}"
        log.warning(
            "%s health check failed (%s), %d of %d in a row",
            self.spec.name, problem, in_a_row, self.health_failures,
        )  # fmt: skip

    def _over_budget(self) -> bool:
        """More than max_restarts crashes within the window (older ones are forgotten)."""
        now = time.monotonic()
        while self._crashes and now - self._crashes[0] > self.restart_window_s:
            self._crashes.popleft()
        return len(self._crashes) > self.max_restarts

    def _backoff(self) -> float:
        recent = max(len(self._crashes), 1)
        return min(self.backoff_initial * 2 ** (recent - 1), self.backoff_max)

    def _gave_up(self, why: str) -> BackendCrashError:
        """One line: how often, why the last one went, what the log said, where the log is."""
        proc = self._proc
        code = proc.returncode if proc is not None else None
        kind, line = classify_failure(self.attempt_log(), code)
        detail = f"{KIND_TEXT[kind]}: {line}" if kind != "unknown" else line or "(no output)"
        crashes = len(self._crashes)
        times = "once" if crashes == 1 else f"{crashes} times"
        return BackendCrashError(
            f"the {self.spec.name} backend failed {times} within "
            f"{self.restart_window_s:.0f} s, so llmup stopped restarting it; last: {why}; "
            f"its output: {detail}; log: {self.log_path}",
            log_path=str(self.log_path),
        )

    def _fail(self, failure: BackendError) -> None:
        self.failure = failure
        self._set_state(State.FAILED)
        self._settled.set()
        log.error("%s", failure)
        if self.on_failure is not None and self._serving:
            try:
                self.on_failure(failure)
            except Exception:
                log.exception("on_failure callback failed")

    def _set_state(self, state: State) -> None:
        with self._changed:
            self._state = state
            self._changed.notify_all()
