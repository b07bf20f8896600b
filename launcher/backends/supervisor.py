"""Run one backend as a supervised child process.

The supervisor starts the spec's command in its own process group, appends its output to a
log file, waits until the health URL answers, restarts it with exponential backoff when it
crashes, and stops it (SIGTERM to the group, wait, SIGKILL) without leaving a process behind,
also when the supervising process itself is killed (Linux parent-death signal).

A child that exits before it was ready is a load failure, classified from its output
(out of memory, corrupt model, missing dependency, port in use) so `serve` can react:
fall back to a smaller candidate on out of memory, stop with a clear message otherwise.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path

import httpx

from launcher.backends.spec import BackendSpec, port_is_free
from launcher.errors import BackendCrashError, BackendError, BackendLoadError

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
LOG_ROTATE_BYTES = 64 * 1024 * 1024
TAIL_LINES = 200

# Order matters: an allocation failure is followed by "failed to load model", and a failed
# import can mention anything, so the more specific causes are looked for first.
FAILURE_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("port_in_use", re.compile(r"address already in use|errno 98\b|EADDRINUSE", re.I)),
    (
        "missing_dependency",
        re.compile(
            r"ModuleNotFoundError|ImportError|No module named|cannot open shared object file"
            r"|Failed to load shared library|Library not loaded",
            re.I,
        ),
    ),
    (
        "out_of_memory",
        re.compile(
            r"out of memory|failed to allocate|unable to allocate|cudaMalloc failed"
            r"|ggml_backend_cuda_buffer_type_alloc_buffer|std::bad_alloc|MemoryError"
            r"|Cannot allocate memory|^Killed$",
            re.I,
        ),
    ),
    (
        "corrupt_model",
        re.compile(
            r"failed to load model|invalid magic|unknown model architecture|unsupported model"
            r"|not within the file bounds|model is corrupted|gguf_init_from|invalid gguf"
            r"|wrong number of tensors|has wrong shape|unknown pre-tokenizer",
            re.I,
        ),
    ),
)
ERRORISH = re.compile(
    r"error|failed|does not|cannot|can't|invalid|unsupported|requires|not supported", re.I
)
# Warnings that look like failures but are not (llama.cpp's mlock warning names ENOMEM).
BENIGN = re.compile(r"mlock", re.I)

KIND_TEXT = {
    "out_of_memory": "out of memory",
    "corrupt_model": "corrupt or unsupported model file",
    "missing_dependency": "missing dependency",
    "port_in_use": "port in use",
    "timeout": "not ready in time",
    "unknown": "cause not recognised",
}
ADVICE = {
    "out_of_memory": "The model, its KV cache or its buffers did not fit: pick a smaller quant "
    "or a shorter context (`llmup plan --context N`), or free memory other processes hold.",
    "corrupt_model": "The model file is damaged or not one this llama.cpp can load: delete it "
    "and download it again (`llmup pull`).",
    "missing_dependency": "A package or shared library the backend needs is missing: "
    "reinstall llmup with the backend's extra (e.g. `pip install 'llmup[exllamav2]'`).",
    "port_in_use": "Another process listens on {address}: stop it, or let llmup pick a port.",
    "timeout": "It did not answer within {timeout:.0f} s: read the log; a slow disk needs a "
    "longer ready timeout.",
    "unknown": "Read the log for the cause.",
}


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


def classify_failure(output: str, returncode: int | None = None) -> tuple[str, str]:
    """(kind, most relevant line) of a backend that exited before it was ready.

    The first matching line of the output's tail is the root cause; what follows it is
    usually the same error propagated ("failed to load model", a Python traceback).
    """
    lines = [ln.strip() for ln in output.splitlines()[-TAIL_LINES:]]
    lines = [ln for ln in lines if ln and not BENIGN.search(ln)]
    for kind, pattern in FAILURE_PATTERNS:
        hit = next((ln for ln in lines if pattern.search(ln)), None)
        if hit is not None:
            return kind, hit
    if returncode in (-signal.SIGKILL, 128 + signal.SIGKILL):
        return "out_of_memory", f"killed by SIGKILL (exit {returncode}), most likely the OOM killer"
    return "unknown", _unknown_cause(lines, returncode)


def _unknown_cause(lines: list[str], returncode: int | None) -> str:
    """The last line, preceded by the error-like line just before a Python traceback
    (llama.cpp says why, e.g. "K cache type q8_0 ... does not divide", then Python raises
    "Failed to create llama_context")."""
    if not lines:
        return f"exit code {returncode} and no output"
    last = lines[-1]
    start = next((i for i, ln in enumerate(lines) if ln.startswith("Traceback")), None)
    if start is None:
        return last
    cause = next(
        (ln for ln in reversed(lines[max(start - 5, 0) : start]) if ERRORISH.search(ln)), None
    )
    return f"{cause} | {last}" if cause else last


def exit_text(returncode: int | None) -> str:
    """'exit code 3' or 'killed by SIGSEGV' (a negative code is the signal's number)."""
    if returncode is not None and returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            pass
    return f"exit code {returncode}"


def load_error(spec: BackendSpec, kind: str, line: str, returncode: int | None) -> BackendLoadError:
    """A BackendLoadError whose message names the cause, the log and what to do next."""
    advice = ADVICE[kind].format(address=f"{spec.host}:{spec.port}", timeout=spec.ready_timeout_s)
    code = "" if returncode is None else f" ({exit_text(returncode)})"
    message = (
        f"the {spec.name} backend failed to start: {KIND_TEXT[kind]}{code}.\n"
        f"  {line}\n  log: {spec.log_path}\n  {advice}"
    )
    return BackendLoadError(
        message, kind=kind, log_path=str(spec.log_path), line=line, returncode=returncode
    )


def parent_death_guard() -> Callable[[], None] | None:
    """A preexec_fn making Linux SIGKILL the child when its supervising thread dies.

    PR_SET_PDEATHSIG fires when the thread that forked the child exits, which is why the
    supervisor forks only from its own monitor thread. None off Linux.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        log.warning("prctl is unavailable: a killed llmup may leave its backend running")
        return None
    parent, sig = os.getpid(), int(signal.SIGKILL)

    def guard() -> None:
        prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the guard was armed
            os._exit(1)

    return guard


def terminate_group(proc: subprocess.Popen, grace_s: float) -> int | None:
    """SIGTERM the child's process group, wait up to grace_s, then SIGKILL the group.

    A child reaped before this call is left alone: whoever saw it exit killed its group
    then, and its pid may since belong to someone else.
    """
    if proc.returncode is not None:
        return proc.returncode
    if proc.poll() is None:
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            log.warning("pid %d ignored SIGTERM for %.0f s; killing it", proc.pid, grace_s)
    _signal_group(proc.pid, signal.SIGKILL)  # the leader, or what it left in its group
    return proc.wait()


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _answers(client: httpx.Client, url: str) -> bool:
    try:
        return client.get(url).status_code == 200
    except httpx.HTTPError:
        return False


def _rotate(path: Path) -> None:
    """Keep one previous log when the current one grew past LOG_ROTATE_BYTES."""
    if path.exists() and path.stat().st_size > LOG_ROTATE_BYTES:
        os.replace(path, path.with_name(path.name + ".1"))


class Supervisor:
    """One backend child: start and wait until ready, restart on crash, stop cleanly.

    `max_restarts` bounds the crashes *in a row*: a child that stayed ready for
    `stable_after_s` resets the count, so a crash a day never exhausts it. The progress
    callback runs on the monitor thread about once a second while a child loads.
    """

    def __init__(
        self,
        spec: BackendSpec,
        *,
        max_restarts: int = 5,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        stable_after_s: float = 60.0,
        stop_timeout_s: float = 10.0,
        poll_interval_s: float = 0.1,
        progress: ProgressFn | None = None,
        progress_interval_s: float = 1.0,
    ) -> None:
        self.spec = spec
        self.max_restarts = max_restarts
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.stable_after_s = stable_after_s
        self.stop_timeout_s = stop_timeout_s
        self.poll_interval_s = poll_interval_s
        self.progress = progress
        self.progress_interval_s = progress_interval_s
        self.restarts = 0
        self.failure: BackendError | None = None
        self._state = State.STOPPED
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self._settled = threading.Event()
        self._guard = parent_death_guard()
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None
        self._attempt = 0
        self._log_offset = 0
        self._ready_at: float | None = None

    # ----- what callers see

    @property
    def state(self) -> State:
        return self._state

    @property
    def pid(self) -> int | None:
        """The running child's pid (also its process group id), None between children."""
        proc = self._proc
        return proc.pid if proc is not None and proc.returncode is None else None

    @property
    def base_url(self) -> str:
        return self.spec.base_url

    @property
    def log_path(self) -> Path:
        return self.spec.log_path

    def __enter__(self) -> Supervisor:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> Supervisor:
        """Start the child and block until it is ready; BackendLoadError if it is not."""
        if self._thread is not None:
            raise RuntimeError("a Supervisor starts once; build a new one to start again")
        self.spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        _rotate(self.spec.log_path)
        self._set_state(State.STARTING)
        self._thread = threading.Thread(
            target=self._run, name=f"supervisor-{self.spec.name}", daemon=True
        )
        self._thread.start()
        try:
            self._settled.wait()
        except BaseException:  # Ctrl-C while loading still takes the child down
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

    def stop(self) -> None:
        """SIGTERM the child's group, wait, SIGKILL; no restart follows. Idempotent."""
        self._stopping.set()
        with self._lock:
            proc = self._proc
        if proc is not None:
            terminate_group(proc, self.stop_timeout_s)
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(self.stop_timeout_s + 5)
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
        self._settled.set()
        crashes = 0
        while True:
            crashes = self._await_crash(crashes)
            if crashes is None or self._stopping.is_set():
                return
            if crashes > self.max_restarts:
                self._fail(self._gave_up(crashes))
                return
            if self._stopping.wait(self._backoff(crashes)):
                return
            self.restarts += 1
            failure = self._launch()
            if failure is not None and not self._stopping.is_set():
                log.warning("restart %d of %s failed: %s", self.restarts, self.spec.name, failure)

    def _launch(self) -> BackendLoadError | None:
        """One attempt: spawn, wait for readiness; the classified error when it fails."""
        self._attempt += 1
        self._ready_at = None
        if not port_is_free(self.spec.host, self.spec.port):
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
        code = terminate_group(proc, 2.0)
        if outcome == "stopped":
            return None
        if outcome == "timeout":
            line = f"no answer from {self.spec.health_url} after {self.spec.ready_timeout_s:.0f} s"
            return load_error(self.spec, "timeout", line, None)
        kind, line = classify_failure(self.attempt_log(), code)
        return load_error(self.spec, kind, line, code)

    def _spawn(self) -> subprocess.Popen | None:
        with self._lock:
            if self._stopping.is_set():
                return None
            with open(self.spec.log_path, "ab") as out:
                out.write(self._banner().encode())
                out.flush()
                self._log_offset = out.tell()
                self._proc = self._popen(out)
        log.info("started %s (pid %d), log %s", self.spec.name, self._proc.pid, self.log_path)
        return self._proc

    def _popen(self, out) -> subprocess.Popen:
        try:
            return subprocess.Popen(
                self.spec.command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.spec.child_env(),
                start_new_session=True,
                preexec_fn=self._guard,
                close_fds=True,
            )
        except OSError as exc:
            line = f"cannot run {self.spec.command[0]}: {exc}"
            raise load_error(self.spec, "missing_dependency", line, None) from exc

    def _banner(self) -> str:
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        return (
            f"\n==== llmup: {self.spec.name} attempt {self._attempt} at {now}\n"
            f"==== {shlex.join(self.spec.command)}\n"
        )

    def _await_ready(self, proc: subprocess.Popen) -> str:
        """'ready', 'exited', 'timeout' or 'stopped', polling the health URL."""
        started = time.monotonic()
        deadline = started + self.spec.ready_timeout_s
        next_report = started + self.progress_interval_s
        with httpx.Client(timeout=2.0, trust_env=False) as client:
            while True:
                if self._stopping.is_set():
                    return "stopped"
                if proc.poll() is not None:
                    _signal_group(proc.pid, signal.SIGKILL)  # what it left in its group
                    return "exited"
                if _answers(client, self.spec.health_url):
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
        self._set_state(State.READY)
        log.info("%s ready at %s (attempt %d)", self.spec.name, self.base_url, self._attempt)

    def _await_crash(self, crashes: int) -> int | None:
        """Wait for the child to exit; the new count of crashes in a row, None if stopped."""
        proc = self._proc
        if proc is not None and self._ready_at is not None:  # else the last launch failed
            code = proc.wait()
            if self._stopping.is_set():
                return None
            _signal_group(proc.pid, signal.SIGKILL)  # what it left in its group
            uptime = time.monotonic() - self._ready_at
            log.warning("%s exited with code %s after %.1f s up", self.spec.name, code, uptime)
        else:
            uptime = 0.0
        self._set_state(State.RESTARTING)
        return 1 if uptime >= self.stable_after_s else crashes + 1

    def _backoff(self, crashes: int) -> float:
        return min(self.backoff_initial * 2 ** (crashes - 1), self.backoff_max)

    def _gave_up(self, crashes: int) -> BackendCrashError:
        proc = self._proc
        code = proc.returncode if proc is not None else None
        kind, line = classify_failure(self.attempt_log(), code)
        if kind == "unknown":
            line = f"{exit_text(code)}; last output: {self._last_line() or '(none)'}"
        times = "once" if crashes == 1 else f"{crashes} times in a row"
        return BackendCrashError(
            f"the {self.spec.name} backend crashed {times} ({KIND_TEXT[kind]}); llmup stopped "
            f"restarting it.\n  {line}\n  log: {self.log_path}",
            log_path=str(self.log_path),
        )

    def _fail(self, failure: BackendError) -> None:
        self.failure = failure
        self._set_state(State.FAILED)
        self._settled.set()
        log.error("%s", failure)

    def _set_state(self, state: State) -> None:
        with self._changed:
            self._state = state
            self._changed.notify_all()
