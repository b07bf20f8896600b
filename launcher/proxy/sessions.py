"""Conversations kept by the proxy, in one SQLite file (WAL) under the llmup home.

A session is keyed by (owner, id): the owner is a hash of the API key that created it
(empty without keys), so another key asking for the same id finds nothing rather than a
"forbidden" that would confirm the id exists. A turn (the new messages and the assistant's
reply, with the turn's token count, the digest of the request that made it and the reply as
sent) is written in one transaction, only once the reply completed, so a failed request
leaves a session exactly as it was. A turn may replace the session's last turns (a client
that edited an earlier message: "rewind"), in the same transaction.

Each session has an `epoch`, a random id given when it is created. A turn is committed only
if the session still has the epoch and the number of turns it had when the turn was loaded:
a session deleted while a reply was being generated stays deleted. Idle sessions expire
after `ttl_s` seconds (0: never). A full disk is a `StorageFullError`, never a half-written
turn.

The store is synchronous and thread-safe (one connection behind a lock); the proxy calls it
from a worker thread so the event loop never waits on the disk.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher.errors import StorageFullError
from launcher.private import private_dir, private_file

log = logging.getLogger(__name__)

DB_NAME = "sessions.sqlite3"
PURGE_EVERY_S = 60.0
TITLE_CHARS = 80
# A turn is not started with less free space than this on the store's disk (SQLite's WAL
# grows by pages, up to its checkpoint size); a commit that still finds the disk full fails
# cleanly, with nothing written.
MIN_FREE_BYTES = 512 * 1024
SQLITE_FULL = 13

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    owner   TEXT NOT NULL,
    id      TEXT NOT NULL,
    system  TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    turns   INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (owner, id)
);
CREATE INDEX IF NOT EXISTS sessions_updated ON sessions (updated);
CREATE TABLE IF NOT EXISTS messages (
    owner   TEXT NOT NULL,
    id      TEXT NOT NULL,
    seq     INTEGER NOT NULL,
    turn    INTEGER NOT NULL,
    message TEXT NOT NULL,
    PRIMARY KEY (owner, id, seq),
    FOREIGN KEY (owner, id) REFERENCES sessions (owner, id) ON DELETE CASCADE
);
CREATE TABLE IF NOT EXISTS turns (
    owner   TEXT NOT NULL,
    id      TEXT NOT NULL,
    turn    INTEGER NOT NULL,
    tokens  INTEGER,
    request TEXT,
    reply   TEXT,
    PRIMARY KEY (owner, id, turn),
    FOREIGN KEY (owner, id) REFERENCES sessions (owner, id) ON DELETE CASCADE
);
"""
# Added after the first release: files made before get the column on open (and its value).
MIGRATIONS = {
    "epoch": ("ALTER TABLE sessions ADD COLUMN epoch TEXT NOT NULL DEFAULT ''",),
    "bytes": (
        "ALTER TABLE sessions ADD COLUMN bytes INTEGER NOT NULL DEFAULT 0",
        "UPDATE sessions SET bytes = COALESCE(length(CAST(system AS BLOB)), 0)"
        " + (SELECT COALESCE(SUM(length(CAST(m.message AS BLOB))), 0) FROM messages m"
        "    WHERE m.owner = sessions.owner AND m.id = sessions.id)"
        " + (SELECT COALESCE(SUM(length(CAST(t.reply AS BLOB))), 0) FROM turns t"
        "    WHERE t.owner = sessions.owner AND t.id = sessions.id)",
    ),
}

Message = dict[str, Any]


def as_json(value: Any) -> str:
    """How a message or a reply is stored."""
    return json.dumps(value, ensure_ascii=False)


def turn_bytes(messages: list[Message], reply: dict[str, Any] | None) -> int:
    """What a turn adds to its owner's stored bytes: its messages and the reply kept for
    retries, as stored (UTF-8 JSON)."""
    stored = [as_json(m) for m in messages] + ([as_json(reply)] if reply else [])
    return sum(len(text.encode("utf-8")) for text in stored)


@dataclass(frozen=True)
class OwnerUsage:
    """What one owner (API key) keeps in the store: live sessions and their stored bytes."""

    sessions: int
    bytes: int


@dataclass(frozen=True)
class TurnRecord:
    """What is kept about a turn besides its messages (absent for turns stored before)."""

    tokens: int | None = None  # content tokens of its messages, the reply's exact count
    request: str | None = None  # digest of the request that made it (to spot a retry)
    reply: dict[str, Any] | None = None  # the reply as sent (returned again to a retry)


@dataclass(frozen=True)
class Conversation:
    """A session's history: the system message apart, then each committed turn in order.

    `epoch` is None when the session does not exist (or has expired)."""

    system: Message | None = None
    turns: list[list[Message]] = field(default_factory=list)
    records: list[TurnRecord] = field(default_factory=list)
    epoch: str | None = None

    def messages(self) -> list[Message]:
        head = [self.system] if self.system else []
        return head + [m for turn in self.turns for m in turn]

    def body(self) -> list[Message]:
        """Every message but the system one."""
        return [m for turn in self.turns for m in turn]

    def record(self, turn: int) -> TurnRecord:
        return self.records[turn] if turn < len(self.records) else TurnRecord()


@dataclass(frozen=True)
class NewTurn:
    """A turn to commit: it replaces the turns from `keep` on (all of them stay when `keep`
    is the number loaded), on the session as loaded (`base`)."""

    base: Conversation
    keep: int
    messages: list[Message]
    system: Message | None = None
    record: TurnRecord = field(default_factory=TurnRecord)


@dataclass(frozen=True)
class SessionInfo:
    id: str
    created: float
    updated: float
    turns: int
    messages: int
    first_user: str | None = None

    @property
    def title(self) -> str | None:
        """The first user message on one line, cut to TITLE_CHARS (what a chat list shows)."""
        if not self.first_user:
            return None
        line = " ".join(self.first_user.split())
        return line if len(line) <= TITLE_CHARS else line[: TITLE_CHARS - 1].rstrip() + "…"

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "session",
            "created": int(self.created),
            "updated": int(self.updated),
            "turns": self.turns,
            "message_count": self.messages,
            "title": self.title,
        }


def _storage_error(exc: sqlite3.Error, path: Path) -> Exception:
    """A full disk as StorageFullError; anything else unchanged."""
    if getattr(exc, "sqlite_errorcode", None) == SQLITE_FULL or "full" in str(exc).lower():
        log.error("the session store %s is on a full disk: %s", path, exc)
        return StorageFullError(
            "the conversation could not be stored: the disk holding the session store is "
            "full; nothing was stored, retry once space is freed"
        )
    return exc


class SessionStore:
    """The SQLite session store; `SessionStore.at_home(home, ttl_s)` for the default file."""

    def __init__(
        self,
        path: str | Path,
        *,
        ttl_s: float = 7 * 86400.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self.ttl_s = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._last_purge = 0.0
        private_dir(self.path.parent)
        private_file(self.path)  # SQLite gives its -wal and -shm files the database's mode
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(SCHEMA)
        self._migrate()
        self.purge_expired()

    @classmethod
    def at_home(cls, home: str | Path, *, ttl_s: float = 7 * 86400.0) -> SessionStore:
        return cls(Path(home) / DB_NAME, ttl_s=ttl_s)

    def _migrate(self) -> None:
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(sessions)")}
        for column, statements in MIGRATIONS.items():
            if column not in columns:
                for statement in statements:
                    self._db.execute(statement)

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

    def _cutoff(self) -> float:
        """Sessions last used before this have expired (never, with a TTL of 0)."""
        return self._clock() - self.ttl_s if self.ttl_s > 0 else float("-inf")

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

    # ----- reads

    def load(self, owner: str, session_id: str) -> Conversation:
        """The session's history; an empty one when it does not exist or has expired."""
        with self._lock:
            row = self._db.execute(
                "SELECT system, epoch FROM sessions WHERE owner=? AND id=? AND updated>=?",
                (owner, session_id, self._cutoff()),
            ).fetchone()
            if row is None:
                return Conversation()
            rows = self._db.execute(
                "SELECT turn, message FROM messages WHERE owner=? AND id=? ORDER BY seq",
                (owner, session_id),
            ).fetchall()
            records = self._db.execute(
                "SELECT turn, tokens, request, reply FROM turns WHERE owner=? AND id=?",
                (owner, session_id),
            ).fetchall()
        turns: dict[int, list[Message]] = {}
        for turn, message in rows:
            turns.setdefault(turn, []).append(json.loads(message))
        by_turn = {t: TurnRecord(k, r, json.loads(p) if p else None) for t, k, r, p in records}
        system = json.loads(row[0]) if row[0] else None
        records_list = [by_turn.get(t, TurnRecord()) for t in sorted(turns)]
        return Conversation(system, list(turns.values()), records_list, epoch=row[1])

    def info(self, owner: str, session_id: str) -> SessionInfo | None:
        return next(iter(self._infos(owner, session_id)), None)

    def list_sessions(self, owner: str) -> list[SessionInfo]:
        """The owner's live sessions, most recently used first."""
        return self._infos(owner, None)

    def _infos(self, owner: str, session_id: str | None) -> list[SessionInfo]:
        query = (
            "SELECT s.id, s.created, s.updated, s.turns, (s.system IS NOT NULL) + "
            "(SELECT COUNT(*) FROM messages m WHERE m.owner=s.owner AND m.id=s.id), "
            "(SELECT json_extract(m.message, '$.content') FROM messages m WHERE m.owner=s.owner "
            "AND m.id=s.id AND json_extract(m.message, '$.role')='user' ORDER BY m.seq LIMIT 1) "
            "FROM sessions s WHERE s.owner=? AND s.updated>=?"
        )
        args: tuple[Any, ...] = (owner, self._cutoff())
        if session_id is not None:
            query, args = query + " AND s.id=?", (*args, session_id)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY s.updated DESC", args).fetchall()
        return [SessionInfo(*row) for row in rows]

    def usage(self, owner: str) -> OwnerUsage:
        """The owner's live sessions and their stored bytes (its per-key limits)."""
        with self._lock:
            row = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM sessions "
                "WHERE owner=? AND updated>=?",
                (owner, self._cutoff()),
            ).fetchone()
        return OwnerUsage(*row)

    def count(self) -> int:
        """Live sessions of every owner (for the metrics gauge)."""
        with self._lock:
            return self._db.execute(
                "SELECT COUNT(*) FROM sessions WHERE updated>=?", (self._cutoff(),)
            ).fetchone()[0]

    # ----- writes

    def commit_turn(
        self,
        owner: str,
        session_id: str,
        messages: list[Message],
        *,
        system: Message | None = None,
    ) -> bool:
        """Append one completed turn to the session as it is now (see `commit`)."""
        base = self.load(owner, session_id)
        turn = NewTurn(base=base, keep=len(base.turns), messages=messages, system=system)
        return self.commit(owner, session_id, turn)

    def commit(self, owner: str, session_id: str, turn: NewTurn) -> bool:
        """Store `turn` atomically, replacing the turns from `turn.keep` on; `system` sets
        (or replaces) the system message, which always stays first. False, with nothing
        stored, when the session is no longer the one the turn was loaded from (deleted,
        or changed meanwhile). An expired session is started afresh."""
        now = self._clock()
        self._maybe_purge(now)
        with self._transaction() as db:
            self._drop_if_expired(db, owner, session_id)
            if not self._claim(db, owner, session_id, turn.base, now):
                log.info("session %s changed or was deleted during a turn; not stored", session_id)
                return False
            freed = self._truncate(db, owner, session_id, turn.keep)
            added = self._append(db, owner, session_id, turn)
            system_json = as_json(turn.system) if turn.system else None
            db.execute(  # the new system message's bytes replace the old one's
                "UPDATE sessions SET turns=?, updated=?, bytes = bytes + ? + COALESCE("
                "length(CAST(? AS BLOB)) - COALESCE(length(CAST(system AS BLOB)), 0), 0), "
                "system=COALESCE(?, system) WHERE owner=? AND id=?",
                (turn.keep + 1, now, added - freed, system_json, system_json, owner, session_id),
            )
        return True

    def _claim(
        self, db: sqlite3.Connection, owner: str, sid: str, base: Conversation, now: float
    ) -> bool:
        """Whether the session is still as loaded; a new one is created here."""
        row = db.execute(
            "SELECT epoch, turns FROM sessions WHERE owner=? AND id=?", (owner, sid)
        ).fetchone()
        if base.epoch is None:
            if row is not None:
                return False
            db.execute(
                "INSERT INTO sessions (owner, id, created, updated, epoch) VALUES (?, ?, ?, ?, ?)",
                (owner, sid, now, now, uuid.uuid4().hex),
            )
            return True
        return row is not None and row[0] == base.epoch and row[1] == len(base.turns)

    def _truncate(self, db: sqlite3.Connection, owner: str, sid: str, keep: int) -> int:
        """Drop the turns from `keep` on; returns the bytes they held."""
        freed = 0
        for table, column in (("messages", "message"), ("turns", "reply")):
            where = f"FROM {table} WHERE owner=? AND id=? AND turn>=?"
            (held,) = db.execute(
                f"SELECT COALESCE(SUM(length(CAST({column} AS BLOB))), 0) {where}",
                (owner, sid, keep),
            ).fetchone()
            db.execute(f"DELETE {where}", (owner, sid, keep))
            freed += held
        return freed

    def _append(self, db: sqlite3.Connection, owner: str, sid: str, turn: NewTurn) -> int:
        """Store the turn's messages and record; returns the bytes they hold."""
        (seq,) = db.execute(
            "SELECT COALESCE(MAX(seq), -1) + 1 FROM messages WHERE owner=? AND id=?", (owner, sid)
        ).fetchone()
        db.executemany(
            "INSERT INTO messages (owner, id, seq, turn, message) VALUES (?, ?, ?, ?, ?)",
            [(owner, sid, seq + i, turn.keep, as_json(m)) for i, m in enumerate(turn.messages)],
        )
        record = turn.record
        reply = as_json(record.reply) if record.reply else None
        db.execute(
            "INSERT INTO turns (owner, id, turn, tokens, request, reply) VALUES (?, ?, ?, ?, ?, ?)",
            (owner, sid, turn.keep, record.tokens, record.request, reply),
        )
        return turn_bytes(turn.messages, record.reply)

    def _drop_if_expired(self, db: sqlite3.Connection, owner: str, session_id: str) -> None:
        db.execute(
            "DELETE FROM sessions WHERE owner=? AND id=? AND updated<?",
            (owner, session_id, self._cutoff()),
        )

    def delete(self, owner: str, session_id: str) -> bool:
        """Delete a live session of this owner; False when there is none."""
        with self._transaction() as db:
            self._drop_if_expired(db, owner, session_id)
            cursor = db.execute("DELETE FROM sessions WHERE owner=? AND id=?", (owner, session_id))
            return cursor.rowcount > 0

    def purge_expired(self) -> int:
        """Delete every session idle for longer than the TTL; returns how many."""
        with self._transaction() as db:
            removed = db.execute("DELETE FROM sessions WHERE updated<?", (self._cutoff(),)).rowcount
        if removed:
            log.info("expired %d idle sessions", removed)
        return removed

    def _maybe_purge(self, now: float) -> None:
        if now - self._last_purge >= PURGE_EVERY_S:
            self._last_purge = now
            self.purge_expired()
