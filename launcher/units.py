"""Memory units and their one spelling: MiB and GiB (2^20 and 2^30 bytes).

nvidia-smi, NVML, sysctl and llama.cpp's logs all speak MiB; the planner computes in bytes
and rounds up at the end, so every module takes these from here.
"""

from __future__ import annotations

MIB = 1024 * 1024
GIB = 1024 * MIB


def ceil_mib(n_bytes: int) -> int:
    """Round up: a plan that under-counts by a fraction of a MiB is still an under-count."""
    return -(-n_bytes // MIB)


def gib_text(n_bytes: float) -> str:
    """'45.2 GiB', the precision plans and tables print."""
    return f"{n_bytes / GIB:.1f} GiB"


def mib_gib_text(mib: int) -> str:
    """The same for a MiB figure, the unit snapshots and plans count in."""
    return gib_text(mib * MIB)
