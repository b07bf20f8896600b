"""The backend's log file: one per model under the llmup home, the child's output appended
after a banner of llmup's own for each attempt, one previous log kept when it grows large.

Both the supervisor and the head start (`headstart`, which spawns a child before the
supervisor exists) start children through `spawn_logged`, so every attempt in the log looks
the same and the supervisor reads a child's output from its banner on.
"""

from __future__ import annotations

import os
import shlex
from datetime import datetime, timezone
from pathlib import Path

from launcher.backends.spec import BackendSpec
from launcher.backends.supervise.failure import OWN_LINE
from launcher.backends.supervise.process import Child, Runtime
from launcher.private import open_private, private_dir

LOG_ROTATE_BYTES = 64 * 1024 * 1024


def prepare_log(path: Path) -> None:
    """The log's private folder, and one previous log kept when the current one grew past
    LOG_ROTATE_BYTES."""
    private_dir(path.parent)
    if path.exists() and path.stat().st_size > LOG_ROTATE_BYTES:
        os.replace(path, path.with_name(path.name + ".1"))


def banner(spec: BackendSpec, attempt: int, note: str = "") -> str:
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return (
        f"\n{OWN_LINE} {spec.name} attempt {attempt} at {now}{note}\n"
        f"==== {shlex.join(spec.command)}\n"
    )


def spawn_logged(
    runtime: Runtime, spec: BackendSpec, attempt: int, *, note: str = ""
) -> tuple[Child, int]:
    """Start `spec` through `runtime` with its output appended to its log after the
    attempt's banner; the child and where its output starts in the log. SpawnError passes
    through."""
    with open_private(spec.log_path, "ab") as out:
        out.write(banner(spec, attempt, note).encode())
        out.flush()
        offset = out.tell()
        return runtime.spawn(spec, out), offset
