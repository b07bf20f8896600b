"""Where a supervised backend runs: a local process group (here) or a container (container.py).

The supervisor asks a runtime to `spawn` a BackendSpec with its output going to the log, and
gets back a Child: something it can poll, wait for, stop (terminate, wait, kill) and reap
(take down whatever the child left once it exited). Readiness, health polling, restarts and
failure classification stay in the supervisor, the same for every runtime.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
from typing import BinaryIO, Protocol

from launcher.backends.spec import BackendSpec
from launcher.backends.supervise.deathsig import guarded

log = logging.getLogger(__name__)


class Child(Protocol):
    """A started backend, local or in a container."""

    @property
    def pid(self) -> int | None: ...

    @property
    def returncode(self) -> int | None: ...

    def poll(self) -> int | None:
        """The exit code once it exited, else None."""

    def wait(self, timeout: float | None = None) -> int:
        """Block until it exits; subprocess.TimeoutExpired after `timeout` seconds."""

    def stop(self, grace_s: float) -> int | None:
        """Terminate, wait up to grace_s, kill; then reap. Its exit code. Idempotent."""

    def reap(self) -> None:
        """After it exited: take down what it left (its process group, its container)."""


class SpawnError(Exception):
    """The child could not even be started; `kind` as the supervisor classifies failures."""

    def __init__(self, line: str, *, kind: str = "missing_dependency") -> None:
        super().__init__(line)
        self.kind = kind


class Runtime(Protocol):
    def spawn(self, spec: BackendSpec, log_file: BinaryIO) -> Child:
        """Start the spec's command with its output appended to `log_file`; SpawnError
        when it cannot be started at all."""


def terminate_group(proc: subprocess.Popen, grace_s: float) -> int | None:
    """SIGTERM the child's process group, wait up to grace_s, then SIGKILL the group.

    A child reaped before this call is left alone: whoever saw it exit killed its group
    then, and its pid may since belong to someone else.
    """
    if proc.returncode is not None:
        return proc.returncode
    if proc.poll() is None:
        signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            log.warning("pid %d ignored SIGTERM for %.1f s; killing it", proc.pid, grace_s)
    signal_group(proc.pid, signal.SIGKILL)  # the leader, or what it left in its group
    return proc.wait()


def signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


class LocalChild:
    """A child process leading its own process group."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.proc.wait(timeout)

    def stop(self, grace_s: float) -> int | None:
        return terminate_group(self.proc, grace_s)

    def reap(self) -> None:
        signal_group(self.proc.pid, signal.SIGKILL)  # what it left in its group


class LocalRuntime:
    """The spec's command as a local child in its own session, with the per-run key in its
    environment, killed if llmup dies (the `deathsig` wrapper arms the parent-death signal
    in the child; spawn from the supervisor's monitor thread, which that signal follows)."""

    def spawn(self, spec: BackendSpec, log_file: BinaryIO) -> LocalChild:
        if shutil.which(spec.command[0]) is None:
            raise SpawnError(f"cannot run {spec.command[0]}: no such program")
        try:
            proc = subprocess.Popen(
                guarded(spec.command),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=spec.child_env(),
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            raise SpawnError(f"cannot run {spec.command[0]}: {exc}") from exc
        return LocalChild(proc)
