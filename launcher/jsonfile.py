"""Small JSON state files in the llmup home, written atomically (temp file + os.replace).

A reader never sees half a file: a crash mid-write leaves the previous version in place.
Files are 0600 in 0700 folders, like everything in the home (`launcher.private`).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from launcher.private import FILE_MODE, private_dir

log = logging.getLogger(__name__)


def read_json(path: Path) -> Any:
    """The file's JSON value; None when it is missing or unreadable (logged)."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        log.warning("ignoring unreadable %s: %s", path, exc)
        return None


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=1, sort_keys=True))


def write_text_atomic(path: Path, text: str, *, mode: int = FILE_MODE) -> None:
    """`text` into `path` (mode `mode`, 0600 by default), all or nothing."""
    path = Path(path)
    private_dir(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), mode)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
