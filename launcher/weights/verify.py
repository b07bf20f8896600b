"""Content checks, so nothing unverified is ever handed to a backend.

The hub client checks only a download's length. LFS files are checked here against the
hub's sha256, small git files against their git blob id. Hashing 40 GB takes a while, so a
successful check is recorded (size and mtime of the blob) under the llmup home and not
repeated while the blob is unchanged.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from launcher.errors import ChecksumError
from launcher.jsonfile import write_json_atomic
from launcher.weights.cache import inside, remove_cached_file
from launcher.weights.trust import check_commit, check_digest, is_blob_name, is_sha256

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
_CHUNK = 8 * 1024 * 1024

Algo = Literal["sha256", "git-sha1"]


@dataclass(frozen=True)
class Digest:
    """What a file's content must hash to."""

    algo: Algo
    value: str

    def __post_init__(self) -> None:
        check_digest(self.algo, self.value)  # it names a blob: never anything but hex

    @classmethod
    def from_blob_name(cls, blob: Path) -> Digest | None:
        """The hub names LFS blobs by sha256 and git blobs by their sha1; offline, that is the
        only reference there is."""
        if is_sha256(blob.name):
            return cls("sha256", blob.name)
        if is_blob_name(blob.name):
            return cls("git-sha1", blob.name)
        return None


def file_digest(path: Path, algo: Algo) -> str:
    """Hash a file in chunks (git-sha1 hashes the `blob <size>\\0` header first, as git does)."""
    h = hashlib.sha256() if algo == "sha256" else hashlib.sha1(usedforsecurity=False)
    if algo == "git-sha1":
        h.update(f"blob {path.stat().st_size}\0".encode())
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def has_gguf_magic(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == GGUF_MAGIC


def check_or_discard(
    pointer: Path, name: str, digest: Digest, size: int | None, *, repo: Path
) -> None:
    """Raise ChecksumError after deleting the blob when the content is not what the hub said.

    Only this file's blob (and its snapshot link) goes, and only inside `repo`, the
    repository's cache folder: the other files of the pull stay.
    """
    actual_size = pointer.stat().st_size
    if size is not None and actual_size != size:
        problem = f"size {actual_size} bytes, expected {size}"
    else:
        actual = file_digest(pointer, digest.algo)
        if actual == digest.value:
            return
        problem = f"{digest.algo} {actual}, expected {digest.value}"
    blob = remove_cached_file(repo, pointer)
    raise ChecksumError(
        f"{name} failed verification ({problem}); deleted its blob {blob}. "
        "Run `llmup pull` again to download it afresh."
    )


def _stamp(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


class VerifiedRecords:
    """Which files of one repo commit llmup has verified, and what it joined.

    Stored as `<llmup home>/verified/<models--org--name>/<commit>.json`. A record is valid
    only while the blob keeps the recorded size and mtime. A blob is content-addressed and
    shared by every commit that has the same file, so a blob another commit's record
    verified (same digest, same size and mtime) counts as verified here too: a new commit
    that changes only a README re-hashes nothing.
    """

    def __init__(self, path: Path, data: dict) -> None:
        self.path = path
        self.data = data
        self.data.setdefault("files", {})
        self.data.setdefault("selections", {})
        self.data.setdefault("joined", {})

    @classmethod
    def load(cls, home: Path, repo_folder_name: str, commit: str) -> VerifiedRecords:
        records = Path(home) / "verified"
        return cls.read(
            inside(records, records / repo_folder_name / f"{check_commit(commit)}.json")
        )

    @classmethod
    def read(cls, path: Path) -> VerifiedRecords:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = {}
        return cls(path, data if isinstance(data, dict) else {})

    @property
    def commit(self) -> str:
        return self.path.stem

    def others(self) -> list[VerifiedRecords]:
        """The records of the repo's other commits, newest file first."""
        paths = [p for p in self.path.parent.glob("*.json") if p != self.path]
        paths.sort(key=lambda p: p.stat().st_mtime_ns, reverse=True)
        return [VerifiedRecords.read(p) for p in paths]

    def is_verified(self, name: str, path: Path, digest: Digest | None = None) -> bool:
        if not path.exists():
            return False
        entry = self.data["files"].get(name)
        if entry and (digest is None or entry.get("digest") == digest.value):
            return {k: entry.get(k) for k in ("size", "mtime_ns")} == _stamp(path)
        return digest is not None and self._verified_elsewhere(path, digest)

    def _verified_elsewhere(self, path: Path, digest: Digest) -> bool:
        stamp = _stamp(path)
        for other in self.others():
            for entry in other.data["files"].values():
                same = entry.get("digest") == digest.value
                if same and {k: entry.get(k) for k in ("size", "mtime_ns")} == stamp:
                    return True
        return False

    def add(self, name: str, path: Path, digest: Digest) -> None:
        self.data["files"][name] = {**_stamp(path), "digest": digest.value, "algo": digest.algo}

    def joined_entry(self, output: str) -> dict | None:
        return self.data["joined"].get(output)

    def is_joined(self, output: str, path: Path, parts: dict[str, str] | None = None) -> bool:
        """The joined file is as recorded (and, online, built from the hub's current parts)."""
        entry = self.joined_entry(output)
        if not entry or not path.is_file():
            return False
        if parts is not None and entry.get("parts") != parts:
            return False
        return {k: entry.get(k) for k in ("size", "mtime_ns")} == _stamp(path)

    def add_joined(self, output: str, path: Path, parts: dict[str, str]) -> None:
        self.data["joined"][output] = {**_stamp(path), "parts": parts}

    def set_selection(self, key: str, names: list[str]) -> None:
        self.data["selections"][key] = names

    def selection(self, key: str) -> list[str] | None:
        return self.data["selections"].get(key)

    def save(self) -> None:
        """Write atomically, so a crash never leaves a half-written record behind."""
        write_json_atomic(self.path, self.data)
