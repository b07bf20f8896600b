"""The llmup home is private to its owner: folders 0700, files 0600.

It holds conversations (`sessions.sqlite3` and its WAL), saved KV caches (`slots/*.kv`,
whose token ids decode back to the chat text), logs and records; none of it is any other
local user's business. Every writer in the home goes through here: folders are made with
`private_dir`, files opened with `open_private` (or written atomically by
`launcher.jsonfile`, 0600), and the processes that only write into the home (the
session-slot worker) run with `UMASK`. `private_home` also takes back what an older llmup
left readable (it made folders 0755 and files 0644).

Modes are set explicitly rather than by a process-wide umask in `llmup` itself: the same
process downloads into the Hugging Face cache, which may be shared on purpose.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)

DIR_MODE = 0o700
FILE_MODE = 0o600
UMASK = 0o077  # what a process that writes only into the home runs with
OTHERS = 0o077  # the group's and the world's bits


def default_home() -> Path:
    """The llmup home when neither LLMUP_HOME nor a profile names one (here, not in
    `settings`, so a worker that only needs the path imports no pydantic-settings)."""
    return Path.home() / ".local" / "share" / "llmup"


# What llmup keeps in its home; only these are tightened in a home that already exists,
# so a home pointed at a folder with other things in it never has them changed.
HOME_ENTRIES = (
    "sessions.sqlite3", "sessions.sqlite3-wal", "sessions.sqlite3-shm", "slots", "logs",
    "verified", "profiles", "pins.json", "calibration.json", "cpu-speed.json",
    "llama-cpp-install.json", "launches.json",
)  # fmt: skip


def private_dir(path: str | Path) -> Path:
    """`path` as a folder, it and every folder made on the way 0700."""
    path = Path(path)
    missing = []
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing.append(folder)
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=DIR_MODE)
        except FileExistsError:
            continue  # made by someone else meanwhile: left as it is
        os.chmod(folder, DIR_MODE)  # the mode mkdir got went through the umask
    return path


def open_private(path: str | Path, mode: str = "ab") -> IO:
    """Open (creating it 0600) a file in the home; an existing one is made 0600 too."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if "a" in mode else os.O_TRUNC)
    fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0), FILE_MODE)
    _tighten_fd(fd)
    return os.fdopen(fd, mode)


def private_file(path: str | Path) -> Path:
    """Create `path` empty and 0600 if it is missing (before a library such as SQLite
    creates it with its own mode), or make the existing file 0600."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), FILE_MODE)
    try:
        _tighten_fd(fd)
    finally:
        os.close(fd)
    return Path(path)


def _tighten_fd(fd: int) -> None:
    st = os.fstat(fd)
    if st.st_mode & OTHERS and st.st_uid == os.geteuid():
        os.fchmod(fd, stat.S_IMODE(st.st_mode) & ~OTHERS)


def private_home(home: str | Path) -> Path:
    """Make the home (or take back an existing one) private: llmup's own entries lose their
    group and world bits, recursively; the home folder itself too, unless it is the user's
    home folder or a shared sticky folder such as /tmp."""
    home = private_dir(home)
    if _may_tighten_folder(home):
        _tighten(home)
    for name in HOME_ENTRIES:
        entry = home / name
        if entry.is_dir() and not entry.is_symlink():
            _tighten_tree(entry)
        elif entry.exists() and not entry.is_symlink():
            _tighten(entry)
    return home


def _may_tighten_folder(home: Path) -> bool:
    try:
        st = home.stat()
    except OSError:
        return False
    shared = st.st_mode & stat.S_ISVTX or home.resolve() in (Path.home().resolve(), Path("/"))
    return not shared


def _tighten_tree(root: Path) -> None:
    _tighten(root)
    for folder, dirs, files in os.walk(root, followlinks=False):
        for name in (*dirs, *files):
            path = Path(folder) / name
            if not path.is_symlink():
                _tighten(path)


def _tighten(path: Path) -> None:
    """Drop the group's and the world's bits from one entry this user owns."""
    try:
        st = path.lstat()
        if st.st_mode & OTHERS and st.st_uid == os.geteuid():
            os.chmod(path, stat.S_IMODE(st.st_mode) & ~OTHERS)
    except OSError as exc:  # a file gone meanwhile, or not ours to change
        log.debug("could not make %s private: %s", path, exc)
