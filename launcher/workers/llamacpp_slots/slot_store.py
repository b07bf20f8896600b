"""Saved session states outside the KV cache: a byte-bounded RAM store, then files on disk.

A `SavedState` is what one sequence held: its token ids and llama.cpp's serialized KV cells
(llama_state_seq_get_data, no logits). When the worker needs a sequence for someone else, the
least recently used session's state goes to `RamStore`; past the RAM budget the oldest there
go to `DiskStore`, one file per (owner, session) under the llmup home, written atomically
(temp file, fsync, rename) with the model's identity and the token ids in a header. A state
is found only under its own key, and a file is used only when its identity matches the
running model and settings exactly; anything else is a miss and the history is read again.

A file is read back only when it was written by this llmup: each ends with an HMAC-SHA256
of everything before it, under a random key kept beside the files (`state_key`, created
0600), because llama.cpp trusts the KV bytes it is handed. Before anything is allocated the
header's sizes must add up to the file's size; a file that fails any check (foreign,
truncated, corrupt, unreadable) is deleted and is a miss, never an error in the engine.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import struct
import time
from array import array
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.workers.generation import SessionKey

logger = logging.getLogger(__name__)

MAGIC = b"LLMUPKV2"  # KV1 files (before the HMAC) are unreadable now, so dropped
SUFFIX = ".kv"
KEY_FILE = "state.key"  # the HMAC key, in the slots folder (mounted with it into a container)
KEY_BYTES = 32
TAG_BYTES = hashlib.sha256().digest_size
MAX_HEADER_BYTES = 64 * 1024  # a header names the model and the session: a few hundred bytes
_LEN = struct.Struct("<I")
_TOKEN_BYTES = array("i").itemsize


@dataclass
class SavedState:
    key: SessionKey
    tokens: array  # array("i"): the token ids whose KV the data holds, position 0 first
    data: bytearray
    used_at: float = 0.0  # when the session last ran (wall clock): expiry counts from it
    origin: str = "ram"  # where it was found: "ram" or "disk"

    @property
    def nbytes(self) -> int:
        return len(self.data) + self.tokens.itemsize * len(self.tokens)


# ---- RAM ----------------------------------------------------------------------------------


class RamStore:
    """Saved states in memory, least recently used first out, at most `budget` bytes."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._states: OrderedDict[SessionKey, SavedState] = OrderedDict()
        self.bytes_held = 0

    def __len__(self) -> int:
        return len(self._states)

    def put(self, state: SavedState) -> list[SavedState]:
        """Keep `state`; returns what no longer fits (oldest first, maybe `state` itself)."""
        self.pop(state.key)
        if state.nbytes > self.budget:
            return [state]
        self._states[state.key] = state
        self.bytes_held += state.nbytes
        spilled = []
        while self.bytes_held > self.budget:
            _, old = self._states.popitem(last=False)
            self.bytes_held -= old.nbytes
            spilled.append(old)
        return spilled

    def pop(self, key: SessionKey) -> SavedState | None:
        state = self._states.pop(key, None)
        if state is not None:
            self.bytes_held -= state.nbytes
        return state

    def purge(self, cutoff: float) -> int:
        """Drop the states of sessions last used before `cutoff`."""
        old = [key for key, state in self._states.items() if state.used_at < cutoff]
        for key in old:
            self.pop(key)
        return len(old)

    def drain(self) -> Iterator[SavedState]:
        """Every state, least recently used first (so on disk the newest are kept longest),
        emptying the store."""
        while self._states:
            _, state = self._states.popitem(last=False)
            self.bytes_held -= state.nbytes
            yield state


# ---- disk ---------------------------------------------------------------------------------


def file_name(key: SessionKey) -> str:
    """A fixed-length name from (owner, session): ids never become paths."""
    digest = hashlib.sha256(f"{key.owner}\0{key.session}".encode()).hexdigest()
    return digest[:40] + SUFFIX


def state_key(path: Path) -> bytes:
    """The HMAC key for saved states: read from `path`, or made (random, mode 0600) when
    there is none or it is damaged. Created by a hard link of a finished temp file, so two
    workers starting together agree on one key and never read a half-written one."""
    try:
        key = path.read_bytes()
        if len(key) == KEY_BYTES:
            return key
        logger.warning("the saved-state key %s is damaged; making a new one", path)
        path.unlink()
    except FileNotFoundError:
        pass
    temp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(secrets.token_bytes(KEY_BYTES))
            out.flush()
            os.fsync(out.fileno())
        os.link(temp, path)
    except FileExistsError:  # another worker made it first: use theirs
        pass
    finally:
        temp.unlink(missing_ok=True)
    return state_key(path)


class DiskStore:
    """One file per session in `folder`, at most `budget` bytes, none older than `ttl_s`.

    `identity` describes the running model and KV settings; a file written under another
    identity is never loaded (it stays until its session saves again, expires or is evicted).
    `key` signs every file (HMAC-SHA256); one signed under another key is never loaded.
    """

    def __init__(
        self, folder: Path, identity: dict[str, Any], *, key: bytes, budget: int, ttl_s: float
    ) -> None:
        self.folder, self.identity, self.budget, self.ttl_s = folder, identity, budget, ttl_s
        self._key = key
        folder.mkdir(parents=True, exist_ok=True)
        self._files: dict[str, tuple[int, float]] = {}  # name -> (size, mtime)
        for path in folder.iterdir():
            if path.name.endswith(SUFFIX):
                stat = path.stat()
                self._files[path.name] = (stat.st_size, stat.st_mtime)
            elif ".tmp-" in path.name:  # a write cut short by a crash
                path.unlink(missing_ok=True)
        self.purge_expired()

    @property
    def bytes_held(self) -> int:
        return sum(size for size, _ in self._files.values())

    def __len__(self) -> int:
        return len(self._files)

    def put(self, state: SavedState) -> bool:
        """Write `state` atomically (a failed write leaves the previous file); False when it
        cannot be written or cannot fit."""
        name = file_name(state.key)
        head = self._head(state)
        size = len(head) + state.nbytes + TAG_BYTES
        if size > self.budget:
            logger.warning("a %d-byte session state exceeds the disk budget", size)
            return False
        self._make_room(size, replacing=name)
        path = self.folder / name
        temp = path.with_name(f"{name}.tmp-{os.getpid()}")
        try:
            with open(temp, "wb") as out:
                tag = hmac.new(self._key, digestmod=hashlib.sha256)
                for part in (head, state.tokens.tobytes(), state.data):
                    tag.update(part)
                    out.write(part)
                out.write(tag.digest())
                out.flush()
                os.fsync(out.fileno())
            os.replace(temp, path)
            if state.used_at:  # the file's age is the session's: expiry and LRU count from it
                os.utime(path, (state.used_at, state.used_at))
        except OSError as exc:
            temp.unlink(missing_ok=True)
            logger.warning("cannot save a session state to %s: %s", path, exc)
            return False
        stat = path.stat()
        self._files[name] = (stat.st_size, stat.st_mtime)
        return True

    def _head(self, state: SavedState) -> bytes:
        header = json.dumps(
            {
                "identity": self.identity,
                "owner": state.key.owner,
                "session": state.key.session,
                "n_tokens": len(state.tokens),
                "n_bytes": len(state.data),
                "saved_at": time.time(),
                "used_at": state.used_at,
            }
        ).encode()
        return MAGIC + _LEN.pack(len(header)) + header

    def get(self, key: SessionKey) -> SavedState | None:
        """The state saved for `key` under this identity; None when absent or unusable.
        Any failure to read it is a miss and the file is deleted: the engine thread calls
        this, and a bad file must cost only a re-read of the history."""
        name = file_name(key)
        if name not in self._files:
            return None
        path = self.folder / name
        try:
            return self._read(path, key)
        except Exception as exc:  # whatever the file holds, it is a miss
            logger.warning("dropping unreadable session state %s: %s", path, exc)
            self.delete(key)
            return None

    def _read(self, path: Path, key: SessionKey) -> SavedState | None:
        with open(path, "rb") as src:
            size = os.fstat(src.fileno()).st_size
            prefix, raw, header = self._read_header(src, size)
            if header["identity"] != self.identity:
                return None  # another model or KV layout: re-reading the history is right
            if (header["owner"], header["session"]) != (key.owner, key.session):
                raise ValueError("the file belongs to another session")
            n_tokens, n_bytes = _sizes(header, size - len(prefix) - len(raw) - TAG_BYTES)
            tokens = array("i")
            tokens.frombytes(_read_exactly(src, n_tokens * _TOKEN_BYTES))
            data = bytearray(n_bytes)
            if src.readinto(data) != n_bytes:
                raise ValueError("the file is truncated")
            self._check_tag(src.read(), prefix, raw, tokens.tobytes(), data)
        return SavedState(key, tokens, data, used_at=header.get("used_at", 0.0), origin="disk")

    def _read_header(self, src: Any, size: int) -> tuple[bytes, bytes, dict[str, Any]]:
        """(magic and length, header bytes, header), checked against the file's size
        before anything the header claims is allocated."""
        prefix = _read_exactly(src, len(MAGIC) + _LEN.size)
        if prefix[: len(MAGIC)] != MAGIC:
            raise ValueError("not a llmup session state file (or one from an older llmup)")
        (length,) = _LEN.unpack(prefix[len(MAGIC) :])
        if length > MAX_HEADER_BYTES or len(prefix) + length + TAG_BYTES > size:
            raise ValueError(f"its header claims {length} bytes in a {size}-byte file")
        raw = _read_exactly(src, length)
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("its header is not an object")
        return prefix, raw, header

    def _check_tag(self, tag: bytes, *parts: bytes | bytearray) -> None:
        expected = hmac.new(self._key, digestmod=hashlib.sha256)
        for part in parts:
            expected.update(part)
        if not hmac.compare_digest(expected.digest(), tag):
            raise ValueError("it was not written by this llmup (its HMAC does not match)")

    def delete(self, key: SessionKey) -> bool:
        name = file_name(key)
        existed = self._forget(name)
        (self.folder / name).unlink(missing_ok=True)
        return existed

    def purge_expired(self, now: float | None = None) -> int:
        cutoff = (time.time() if now is None else now) - self.ttl_s
        old = [name for name, (_, mtime) in self._files.items() if mtime < cutoff]
        for name in old:
            self._forget(name)
            (self.folder / name).unlink(missing_ok=True)
        return len(old)

    def _forget(self, name: str) -> bool:
        return self._files.pop(name, None) is not None

    def _make_room(self, incoming: int, *, replacing: str) -> None:
        """Delete the least recently written files until `incoming` more bytes fit (the
        file being replaced does not count)."""
        by_age = sorted((n for n in self._files if n != replacing), key=lambda n: self._files[n][1])
        held = self._files.get(replacing, (0, 0.0))[0]
        while by_age and self.bytes_held - held + incoming > self.budget:
            name = by_age.pop(0)
            self._forget(name)
            (self.folder / name).unlink(missing_ok=True)
            logger.info("session state %s evicted from disk (budget %d bytes)", name, self.budget)


def _sizes(header: dict[str, Any], room: int) -> tuple[int, int]:
    """The header's token and byte counts, which must fill the `room` the file has left."""
    n_tokens, n_bytes = header["n_tokens"], header["n_bytes"]
    if not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in (n_tokens, n_bytes)
    ):
        raise ValueError("its header's sizes are not counts")
    if n_tokens * _TOKEN_BYTES + n_bytes != room:
        raise ValueError(
            f"its header claims {n_tokens} tokens and {n_bytes} bytes, the file holds {room}"
        )
    return n_tokens, n_bytes


def _read_exactly(src: Any, n: int) -> bytes:
    data = src.read(n)
    if len(data) != n:
        raise ValueError("the file is truncated")
    return data


# ---- both ---------------------------------------------------------------------------------


class SlotStore:
    """RAM first, disk past the RAM budget; `take` hands a state back to a sequence.
    States of sessions idle longer than `ttl_s` (the proxy's session expiry) are dropped."""

    def __init__(self, ram: RamStore, disk: DiskStore | None, *, ttl_s: float = 7 * 86400.0):
        self.ram, self.disk, self.ttl_s = ram, disk, ttl_s

    def purge_expired(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        dropped = self.ram.purge(now - self.ttl_s)
        if self.disk is not None:
            dropped += self.disk.purge_expired(now)
        return dropped

    def put(self, state: SavedState) -> None:
        for spilled in self.ram.put(state):
            if self.disk is not None:
                self.disk.put(spilled)

    def take(self, key: SessionKey) -> SavedState | None:
        """The newest saved state of `key`. A disk file stays: it is still a valid (older)
        checkpoint if the worker dies before the session is saved again."""
        state = self.ram.pop(key)
        if state is None and self.disk is not None:
            state = self.disk.get(key)
        return state

    def delete(self, key: SessionKey) -> bool:
        held = self.ram.pop(key) is not None
        if self.disk is not None:
            held = self.disk.delete(key) or held
        return held

    def persist(self, state: SavedState) -> bool:
        """Straight to disk (at shutdown); False without a disk store or room on it."""
        self.ram.pop(state.key)
        return self.disk.put(state) if self.disk is not None else False

    def flush(self) -> int:
        """Write every RAM state to disk (at shutdown); returns how many were written."""
        if self.disk is None:
            return 0
        return sum(self.disk.put(state) for state in self.ram.drain())
