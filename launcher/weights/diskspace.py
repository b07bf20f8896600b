"""Refuse a download the disk cannot hold before the first byte is written.

Finding out at 38 of 41 GB is what users of other launchers report; the check is cheap.
Needs are summed per filesystem, so the download (hub cache) and the joined copy of split
files count together when they land on the same disk.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from launcher.errors import DiskSpaceError

log = logging.getLogger(__name__)

GB = 1_000_000_000


@dataclass(frozen=True)
class Need:
    """`bytes` that will be written under `folder`, described for the message."""

    folder: Path
    bytes: int
    what: str


def existing_ancestor(path: Path) -> Path:
    """The nearest folder that exists (the target may not be created yet)."""
    path = Path(path).resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: Path) -> int:
    """Free bytes for an unprivileged writer on the filesystem holding `path`."""
    return shutil.disk_usage(existing_ancestor(path)).free


def check_disk_space(needs: list[Need]) -> None:
    """Raise DiskSpaceError naming the numbers and the folder when a filesystem is short."""
    by_device: dict[int, list[Need]] = {}
    for need in needs:
        if need.bytes > 0:
            device = os.stat(existing_ancestor(need.folder)).st_dev
            by_device.setdefault(device, []).append(need)
    for group in by_device.values():
        _check_group(group)


def _check_group(group: list[Need]) -> None:
    total = sum(n.bytes for n in group)
    folder = group[0].folder
    free = free_bytes(folder)
    log.debug("disk check: need %d bytes under %s, %d free", total, folder, free)
    if free >= total:
        return
    parts = " + ".join(f"{n.bytes / GB:.2f} GB {n.what}" for n in group)
    where = ", ".join(sorted({str(n.folder) for n in group}))
    raise DiskSpaceError(
        f"not enough disk space: need {total / GB:.2f} GB ({parts}) in {where}, "
        f"but only {free / GB:.2f} GB is free there. Free {((total - free) / GB):.2f} GB, "
        "or point HF_HUB_CACHE (or HF_HOME) at a larger disk."
    )
