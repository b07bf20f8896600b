"""The session store's logic, written once in the SQL that SQLite and PostgreSQL share.

`SqlStore` holds every query (`?` placeholders; the PostgreSQL store translates them) and
the rules of the base module: one transaction per turn, the epoch and turn-count claim, the
TTL. Its subclasses give it a connection (`_transaction` to write, `_reading` for a
consistent read), the few spellings the two dialects do not share (`json_text`,
`byte_length`, `for_update`) and the translation of their errors into llmup's (a full disk,
a database that cannot be reached).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import Any, Protocol

from launcher.errors import SessionConflictError
from launcher.proxy.store.base import (
    Conversation,
    ConversationRecord,
    Message,
    NewTurn,
    OwnerUsage,
    ResponseRecord,
    SessionInfo,
    StoredResponse,
    TurnRecord,
    as_json,
    turn_bytes,
)

log = logging.getLogger(__name__)

PURGE_EVERY_S = 60.0
DEFAULT_TTL_S = 7 * 86400.0


class Cursor(Protocol):
    rowcount: int

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Db(Protocol):
    """The part of a DB-API connection the store uses (sqlite3's, or psycopg's adapted)."""

    def execute(self, sql: str, params: Iterable[Any] = ()) -> Cursor: ...

    def executemany(self, sql: str, rows: Iterable[Iterable[Any]]) -> Any: ...


class SqlStore(ABC):
    """Sessions in SQL; see `launcher.proxy.store.base` for what is promised."""

    kind = "sql"
    for_update = ""  # what locks the session's row while a turn is claimed

    def __init__(self, *, ttl_s: float = DEFAULT_TTL_S, clock: Callable[[], float] = time.time):
        self.ttl_s = ttl_s
        self._clock = clock
        self._last_purge = 0.0

    @abstractmethod
    def _transaction(self) -> AbstractContextManager[Db]:
        """A write transaction, committed when the block ends, rolled back on an error."""

    @abstractmethod
    def _reading(self) -> AbstractContextManager[Db]:
        """A connection whose reads in the block see one consistent state."""

    @abstractmethod
    def json_text(self, column: str, key: str) -> str:
        """SQL for a top-level string field of a JSON text column."""

    @abstractmethod
    def byte_length(self, expr: str) -> str:
        """SQL for the UTF-8 length in bytes of a text column or parameter (NULL for NULL)."""

    @abstractmethod
    def check_space(self) -> None: ...

    @abstractmethod
    def close(self) -> None: ...

    def _cutoff(self) -> float:
        """Sessions last used before this have expired (never, with a TTL of 0)."""
        return self._clock() - self.ttl_s if self.ttl_s > 0 else float("-inf")

    # ----- reads

    def load(self, owner: str, session_id: str) -> Conversation:
        """The session's history; an empty one when it does not exist or has expired."""
        with self._reading() as db:  # all three sent before any is read (one round trip)
            head = db.execute(
                "SELECT system, epoch FROM sessions WHERE owner=? AND id=? AND updated>=?",
                (owner, session_id, self._cutoff()),
            )
            body = db.execute(
                "SELECT turn, message FROM messages WHERE owner=? AND id=? ORDER BY seq",
                (owner, session_id),
            )
            kept = db.execute(
                "SELECT turn, tokens, request, reply FROM turns WHERE owner=? AND id=?",
                (owner, session_id),
            )
            row, rows, records = head.fetchone(), body.fetchall(), kept.fetchall()
        if row is None:
            return Conversation()
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
        content, role = self.json_text("m.message", "content"), self.json_text("m.message", "role")
        query = (
            "SELECT s.id, s.created, s.updated, s.turns, "
            "CASE WHEN s.system IS NULL THEN 0 ELSE 1 END + "
            "(SELECT COUNT(*) FROM messages m WHERE m.owner=s.owner AND m.id=s.id), "
            f"(SELECT {content} FROM messages m WHERE m.owner=s.owner "
            f"AND m.id=s.id AND {role}='user' ORDER BY m.seq LIMIT 1) "
            "FROM sessions s WHERE s.owner=? AND s.updated>=?"
        )
        args: tuple[Any, ...] = (owner, self._cutoff())
        if session_id is not None:
            query, args = query + " AND s.id=?", (*args, session_id)
        with self._reading() as db:
            rows = db.execute(query + " ORDER BY s.updated DESC", args).fetchall()
        return [SessionInfo(*row) for row in rows]

    def count(self) -> int:
        """Live sessions of every owner (for the metrics gauge)."""
        with self._reading() as db:
            return db.execute(
                "SELECT COUNT(*) FROM sessions WHERE updated>=?", (self._cutoff(),)
            ).fetchone()[0]

    def usage(self, owner: str) -> OwnerUsage:
        """The owner's live sessions and their stored bytes (its per-key limits)."""
        with self._reading() as db:
            row = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM sessions "
                "WHERE owner=? AND updated>=?",
                (owner, self._cutoff()),
            ).fetchone()
        return OwnerUsage(int(row[0]), int(row[1]))

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
        stored, when the session was deleted since it was loaded; SessionConflictError when
        another writer changed it meanwhile. An expired session is started afresh."""
        now = self._clock()
        self._maybe_purge(now)
        with self._transaction() as db:
            self._drop_if_expired(db, owner, session_id)
            if not self._claim(db, owner, session_id, turn.base, now):
                log.info("session %s was deleted during a turn; not stored", session_id)
                return False
            freed = self._truncate(db, owner, session_id, turn.keep)
            added = self._seed(db, owner, session_id, turn) + self._append(
                db, owner, session_id, turn
            )
            system = turn.system or (turn.base.system if _branches(turn) else None)
            system_json = as_json(system) if system else None
            new, old = self.byte_length("?"), self.byte_length("system")
            db.execute(  # the new system message's bytes replace the old one's
                f"UPDATE sessions SET turns=?, updated=?, bytes = bytes + ? + "
                f"COALESCE({new} - COALESCE({old}, 0), 0), system=COALESCE(?, system) "
                "WHERE owner=? AND id=?",
                (turn.keep + 1, now, added - freed, system_json, system_json, owner, session_id),
            )
        return True

    def _claim(self, db: Db, owner: str, sid: str, base: Conversation, now: float) -> bool:
        """Whether the session is still as loaded (its row locked until the commit); a new
        one is created here."""
        row = db.execute(
            "SELECT epoch, turns FROM sessions WHERE owner=? AND id=?" + self.for_update,
            (owner, sid),
        ).fetchone()
        if base.epoch is None:
            if row is not None:
                raise conflict(sid)
            db.execute(
                "INSERT INTO sessions (owner, id, created, updated, epoch) VALUES (?, ?, ?, ?, ?)",
                (owner, sid, now, now, uuid.uuid4().hex),
            )
            return True
        if row is None or row[0] != base.epoch:
            return False  # deleted (and perhaps started again) meanwhile: deleting wins
        if row[1] != len(base.turns):
            raise conflict(sid)
        return True

    def _truncate(self, db: Db, owner: str, sid: str, keep: int) -> int:
        """Drop the turns from `keep` on (and the responses they were); returns the bytes
        they held."""
        freed = 0
        tables = (("messages", "id", ("message",)), ("turns", "id", ("reply",)),
                  ("responses", "session", ("body", "input")))  # fmt: skip
        for table, key, columns in tables:
            where = f"FROM {table} WHERE owner=? AND {key}=? AND turn>=?"
            size = " + ".join(f"COALESCE({self.byte_length(c)}, 0)" for c in columns)
            (held,) = db.execute(
                f"SELECT COALESCE(SUM({size}), 0) {where}", (owner, sid, keep)
            ).fetchone()
            db.execute(f"DELETE {where}", (owner, sid, keep))
            freed += int(held)
        return freed

    def _seed(self, db: Db, owner: str, sid: str, turn: NewTurn) -> int:
        """A branch's copy of its base's first `keep` turns; returns the bytes they hold."""
        if not _branches(turn):
            return 0
        added = 0
        for index, messages in enumerate(turn.base.turns[: turn.keep]):
            copied = NewTurn(turn.base, index, messages, record=turn.base.record(index))
            added += self._append(db, owner, sid, copied)
        return added

    def _append(self, db: Db, owner: str, sid: str, turn: NewTurn) -> int:
        """Store the turn's messages, record and response; returns the bytes they hold."""
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
        return turn_bytes(turn.messages, record.reply) + self._add_response(db, owner, sid, turn)

    def _add_response(self, db: Db, owner: str, sid: str, turn: NewTurn) -> int:
        response = turn.response
        if response is None:
            return 0
        db.execute(
            "INSERT INTO responses (owner, id, session, turn, created, body, input) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (owner, response.id, sid, turn.keep, response.created,
             as_json(response.body), as_json(response.input)),
        )  # fmt: skip
        return response.stored_bytes()

    def _drop_if_expired(self, db: Db, owner: str, session_id: str) -> None:
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

    # ----- the Responses and Conversations APIs' records

    def response(self, owner: str, response_id: str) -> StoredResponse | None:
        """A stored response of this owner whose session is live; None otherwise."""
        with self._reading() as db:
            row = db.execute(
                "SELECT r.session, r.turn, r.created, r.body, r.input FROM responses r "
                "JOIN sessions s ON s.owner=r.owner AND s.id=r.session "
                "WHERE r.owner=? AND r.id=? AND s.updated>=?",
                (owner, response_id, self._cutoff()),
            ).fetchone()
        if row is None:
            return None
        session, turn, created, body, items = row
        record = ResponseRecord(response_id, created, json.loads(body), json.loads(items))
        return StoredResponse(record, session, int(turn))

    def delete_response(self, owner: str, response_id: str) -> tuple[bool, str | None]:
        """Delete a stored response: (whether there was one, the session deleted with it:
        the last response of a chain that is no conversation takes its session along)."""
        found = self.response(owner, response_id)
        if found is None:
            return False, None
        with self._transaction() as db:
            db.execute(
                f"UPDATE sessions SET bytes = bytes - (SELECT COALESCE(SUM("
                f"{self.byte_length('body')} + {self.byte_length('input')}), 0) FROM responses "
                "WHERE owner=? AND id=?) WHERE owner=? AND id=?",
                (owner, response_id, owner, found.session),
            )
            db.execute("DELETE FROM responses WHERE owner=? AND id=?", (owner, response_id))
            left = db.execute(
                "SELECT (SELECT COUNT(*) FROM responses WHERE owner=? AND session=?) + "
                "(SELECT COUNT(*) FROM conversations WHERE owner=? AND id=?)",
                (owner, found.session, owner, found.session),
            ).fetchone()[0]
            if left:
                return True, None
            db.execute("DELETE FROM sessions WHERE owner=? AND id=?", (owner, found.session))
        return True, found.session

    def create_conversation(
        self,
        owner: str,
        conversation: ConversationRecord,
        messages: list[Message],
        *,
        system: Message | None = None,
    ) -> None:
        """A new conversation (a new session), with `messages` as its first turn if any."""
        now = conversation.created
        self._maybe_purge(now)
        with self._transaction() as db:
            system_json = as_json(system) if system else None
            db.execute(
                "INSERT INTO sessions (owner, id, system, created, updated, epoch, bytes) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (owner, conversation.id, system_json, now, now, uuid.uuid4().hex,
                 len(system_json.encode("utf-8")) if system_json else 0),
            )  # fmt: skip
            db.execute(
                "INSERT INTO conversations (owner, id, metadata) VALUES (?, ?, ?)",
                (owner, conversation.id, as_json(conversation.metadata)),
            )
            if messages:
                first = NewTurn(Conversation(), 0, messages)
                added = self._append(db, owner, conversation.id, first)
                db.execute(
                    "UPDATE sessions SET turns=1, bytes=bytes+? WHERE owner=? AND id=?",
                    (added, owner, conversation.id),
                )

    def conversation(self, owner: str, conversation_id: str) -> ConversationRecord | None:
        """A live conversation of this owner; None otherwise."""
        with self._reading() as db:
            row = db.execute(
                "SELECT s.created, c.metadata FROM conversations c "
                "JOIN sessions s ON s.owner=c.owner AND s.id=c.id "
                "WHERE c.owner=? AND c.id=? AND s.updated>=?",
                (owner, conversation_id, self._cutoff()),
            ).fetchone()
        return ConversationRecord(conversation_id, row[0], json.loads(row[1])) if row else None

    def update_conversation(
        self, owner: str, conversation_id: str, metadata: dict[str, str]
    ) -> ConversationRecord | None:
        """Replace a live conversation's metadata; None when there is no such conversation."""
        if self.conversation(owner, conversation_id) is None:
            return None
        with self._transaction() as db:
            db.execute(
                "UPDATE conversations SET metadata=? WHERE owner=? AND id=?",
                (as_json(metadata), owner, conversation_id),
            )
        return self.conversation(owner, conversation_id)

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


def _branches(turn: NewTurn) -> bool:
    """Whether the turn starts a new session as a copy of its base's first turns."""
    return turn.base.epoch is None and turn.keep > 0


def conflict(session_id: str) -> SessionConflictError:
    log.warning("session %s was changed by another writer during a turn; not stored", session_id)
    return SessionConflictError(
        f"the session `{session_id}` was changed by another request while this reply was "
        "generated (a second replica answered it); this turn was not stored: send it again",
        param="session_id",
    )
