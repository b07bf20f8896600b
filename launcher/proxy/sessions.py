"""Conversations kept by the proxy, in one SQLite file (WAL) under the llmup home.

A session is keyed by (owner, id): the owner is a hash of the API key that created it
(empty without keys), so another key asking for the same id finds nothing rather than a
"forbidden" that would confirm the id exists. A turn (the new user messages and the
assistant's reply) is written in one transaction, only once the reply completed, so a failed
request leaves a session exactly as it was. Idle sessions expire after `ttl_s`.

The store is synchronous and thread-safe (one connection behind a lock); the proxy calls it
from a worker thread so the event loop never waits on the disk.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DB_NAME = "sessions.sqlite3"
PURGE_EVERY_S = 60.0
TITLE_CHARS = 80

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
"""

Message = dict[str, Any]


@dataclass(frozen=True)
class Conversation:
    """A session's history: the system message apart, then each committed turn in order."""

    system: Message | None = None
    turns: list[list[Message]] = field(default_factory=list)

    def messages(self) -> list[Message]:
        head = [self.system] if self.system else []
        return head + [m for turn in self.turns for m in turn]

    def body(self) -> list[Message]:
        """Every message but the system one."""
        return [m for turn in self.turns for m in turn]


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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(SCHEMA)
        self.purge_expired()

    @classmethod
    def at_home(cls, home: str | Path, *, ttl_s: float = 7 * 86400.0) -> SessionStore:
        return cls(Path(home) / DB_NAME, ttl_s=ttl_s)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _cutoff(self) -> float:
        return self._clock() - self.ttl_s

    # ----- reads

    def load(self, owner: str, session_id: str) -> Conversation:
        """The session's history; an empty one when it does not exist or has expired."""
        with self._lock:
            row = self._db.execute(
                "SELECT system FROM sessions WHERE owner=? AND id=? AND updated>=?",
                (owner, session_id, self._cutoff()),
            ).fetchone()
            if row is None:
                return Conversation()
            rows = self._db.execute(
                "SELECT turn, message FROM messages WHERE owner=? AND id=? ORDER BY seq",
                (owner, session_id),
            ).fetchall()
        turns: dict[int, list[Message]] = {}
        for turn, message in rows:
            turns.setdefault(turn, []).append(json.loads(message))
        system = json.loads(row[0]) if row[0] else None
        return Conversation(system=system, turns=list(turns.values()))

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
    ) -> None:
        """Append one completed turn, atomically; `system` sets (or replaces) the system
        message, which always stays first. An expired session is started afresh."""
        now = self._clock()
        self._maybe_purge(now)
        with self._transaction() as db:
            self._drop_if_expired(db, owner, session_id)
            db.execute(
                "INSERT INTO sessions (owner, id, created, updated) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (owner, id) DO NOTHING",
                (owner, session_id, now, now),
            )
            turn, seq = db.execute(
                "SELECT s.turns, (SELECT COALESCE(MAX(seq), -1) + 1 FROM messages m "
                "WHERE m.owner=s.owner AND m.id=s.id) FROM sessions s WHERE owner=? AND id=?",
                (owner, session_id),
            ).fetchone()
            db.executemany(
                "INSERT INTO messages (owner, id, seq, turn, message) VALUES (?, ?, ?, ?, ?)",
                [
                    (owner, session_id, seq + i, turn, json.dumps(m, ensure_ascii=False))
                    for i, m in enumerate(messages)
                ],
            )
            system_json = json.dumps(system, ensure_ascii=False) if system else None
            db.execute(
                "UPDATE sessions SET turns=turns+1, updated=?, system=COALESCE(?, system) "
                "WHERE owner=? AND id=?",
                (now, system_json, owner, session_id),
            )

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
