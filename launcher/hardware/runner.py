"""How detectors run external probes (nvidia-smi, sysctl).

Detectors take a `Runner` instead of calling subprocess themselves, so tests can replay
recorded outputs on any machine. A runner returns stdout and signals failure the way
`subprocess.run(check=True)` does: FileNotFoundError when the program is not installed,
CalledProcessError on a non-zero exit, TimeoutExpired when the probe hangs.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable

Runner = Callable[[list[str]], str]

PROBE_TIMEOUT_S = 15.0


def run_command(cmd: list[str], *, timeout: float = PROBE_TIMEOUT_S) -> str:
    """Run a probe and return its stdout; a hung driver must not hang `llmup detect`."""
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True)
    return result.stdout
