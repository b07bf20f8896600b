"""The default session store: one SQLite file (WAL) under the llmup home.

One connection behind a lock serves every thread of the process; writes take SQLite's
write lock up front (`BEGIN IMMEDIATE`), so two processes sharing a file serialize too. A
full disk is a `StorageFullError`, checked before a turn is generated (`check_space`) and
again by the commit, which then leaves nothing written. The file is created 0600 in a
0700 folder before SQLite opens it (`launcher.private`): SQLite gives its -wal and -shm files
the database's mode, so the conversations stay their owner's whatever the umask.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from launcher.errors import StorageFullError
from launcher.private import private_dir, private_file
from launcher.proxy.store import migrations
from launcher.proxy.store.sql import DEFAULT_TTL_S, SqlStore

log = logging.getLogger(__name__)

DB_NAME = "sessions.sqlite3"
# A turn is not started with less free space than this on the store's disk (SQLite's WAL
# grows by pages, up to its checkpoint size); a commit that still finds the disk full fails
# cleanly, with nothing written.
MIN_FREE_BYTES = 512 * 1024
SQLITE_FULL = 13


def _storage_error(exc: sqlite3.Error, path: Path) -> Exception:
    """A full disk as StorageFullError; anything else unchanged."""
    if getattr(exc, "sqlite_errorcode", None) == SQLITE_FULL or "full" in str(exc).lower():
        log.error("the session store %s is on a full disk: %s", path, exc)
        return StorageFullError(
            "the conversation could not be stored: the disk holding the session store is "
            "full; nothing was stored, retry once space is freed"
        )
    return exc


class SqliteStore(SqlStore):
    """The SQLite session store; `SqliteStore.at_home(home, ttl_s=...)` for the default file."""

    kind = "sqlite"

    def __init__(
        self,
        path: str | Path,
        *,
        ttl_s: float = DEFAULT_TTL_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(ttl_s=ttl_s, clock=clock)
        self.path = Path(path)
        self._lock = threading.Lock()
        private_dir(self.path.parent)  # conversations are their owner's only (0700, 0600)
        private_file(self.path)  # before SQLite creates it: its -wal and -shm take its mode
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA busy_timeout=5000")
        with self._transaction() as db:
            migrations.upgrade(db, "sqlite")
        self.purge_expired()

    @classmethod
    def at_home(cls, home: str | Path, *, ttl_s: float = DEFAULT_TTL_S) -> SqliteStore:
        return cls(Path(home) / DB_NAME, ttl_s=ttl_s)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                if self._db.in_transaction:  # a failed COMMIT leaves the transaction open
                    self._db.execute("ROLLBACK")
                raise _storage_error(exc, self.path) from exc

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            yield self._db

    def json_text(self, column: str, key: str) -> str:
        return f"json_extract({column}, '$.{key}')"

    def byte_length(self, expr: str) -> str:
        return f"length(CAST({expr} AS BLOB))"  # length() of TEXT counts characters

    def check_space(self) -> None:
        """StorageFullError when the store's disk has too little room to start a turn."""
        stats = os.statvfs(self.path.parent)
        free = stats.f_bavail * stats.f_frsize
        if free < MIN_FREE_BYTES:
            log.error("%d bytes free for the session store %s", free, self.path)
            raise StorageFullError(
                "the conversation cannot be stored: the disk holding the session store is "
                f"full ({free // 1024} KiB free); nothing was generated or stored, retry once "
                "space is freed"
            )
