"""What a session store keeps and the one interface every store offers (SQLite, PostgreSQL).

A session is keyed by (owner, id): the owner is a hash of the API key that created it
(empty without keys), so another key asking for the same id finds nothing rather than a
"forbidden" that would confirm the id exists. A turn (the new messages and the assistant's
reply, with the turn's token count, the digest of the request that made it and the reply as
sent) is written in one transaction, only once the reply completed, so a failed request
leaves a session exactly as it was. A turn may replace the session's last turns (a client
that edited an earlier message: "rewind"), in the same transaction.

Each session has an `epoch`, a random id given when it is created. A turn is committed only
if the session still has the epoch and the number of turns it had when the turn was loaded:
a session deleted while a reply was being generated stays deleted (`commit` says False), and
one changed meanwhile by another process sharing the store (a second replica) refuses the
turn with a `SessionConflictError` rather than storing it over the other. Idle sessions
expire after `ttl_s` seconds (0: never). A full disk is a `StorageFullError`, a database
that cannot be reached a `StoreUnavailableError`, never a half-written turn.

Each session also keeps its stored bytes (its messages', system message's and kept
replies' JSON, as stored), brought up to date by every commit in the same transaction, so
an owner's usage (sessions and bytes, the per-key limits) is one query, however many
replicas write.

Stores are synchronous and thread-safe; the proxy calls them from worker threads so the
event loop never waits on a disk or a database.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Protocol

TITLE_CHARS = 80

Message = dict[str, Any]


def as_json(value: Any) -> str:
    """How a message or a reply is stored (the text whose UTF-8 bytes a key's limit counts)."""
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
class ResponseRecord:
    """A stored response of the Responses API: the turn it is is committed with it."""

    id: str
    created: float
    body: dict[str, Any]  # the Response object as sent
    input: list[dict[str, Any]]  # its input items, as `GET .../input_items` lists them

    def stored_bytes(self) -> int:
        return sum(len(as_json(v).encode("utf-8")) for v in (self.body, self.input))


@dataclass(frozen=True)
class StoredResponse:
    """A stored response and where its turn is: `turn` of the session `session`."""

    record: ResponseRecord
    session: str
    turn: int


@dataclass(frozen=True)
class ConversationRecord:
    """A conversation of the Conversations API: a session with metadata."""

    id: str
    created: float
    metadata: dict[str, str]


@dataclass(frozen=True)
class NewTurn:
    """A turn to commit: it replaces the turns from `keep` on (all of them stay when `keep`
    is the number loaded), on the session as loaded (`base`).

    A `base` without an epoch is a new session; with `keep` above 0 it starts as a copy of
    `base`'s first `keep` turns and system message (a branch of another session, written in
    the same transaction as its first turn, so a failed turn leaves no branch behind).
    `response` is the Responses API's record of this turn, stored with it."""

    base: Conversation
    keep: int
    messages: list[Message]
    system: Message | None = None
    record: TurnRecord = field(default_factory=TurnRecord)
    response: ResponseRecord | None = None


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


class SessionStore(Protocol):
    """What the proxy needs of a session store; `launcher.proxy.store.open_store` picks one.

    `kind` names the implementation ("sqlite", "postgresql") for /health and the logs."""

    kind: str
    ttl_s: float

    def load(self, owner: str, session_id: str) -> Conversation:
        """The session's history; an empty one when it does not exist or has expired."""

    def info(self, owner: str, session_id: str) -> SessionInfo | None: ...

    def list_sessions(self, owner: str) -> list[SessionInfo]:
        """The owner's live sessions, most recently used first."""

    def count(self) -> int:
        """Live sessions of every owner (for the metrics gauge)."""

    def usage(self, owner: str) -> OwnerUsage:
        """The owner's live sessions and their stored bytes (its per-key limits)."""

    def check_space(self) -> None:
        """StorageFullError when a turn could not be stored (checked before generating)."""

    def commit_turn(
        self, owner: str, session_id: str, messages: list[Message], *, system: Message | None = None
    ) -> bool:
        """Append one completed turn to the session as it is now (see `commit`)."""

    def commit(self, owner: str, session_id: str, turn: NewTurn) -> bool:
        """Store `turn` atomically; False, with nothing stored, when the session was deleted
        since it was loaded; SessionConflictError when another writer changed it."""

    def delete(self, owner: str, session_id: str) -> bool:
        """Delete a live session of this owner; False when there is none."""

    def response(self, owner: str, response_id: str) -> StoredResponse | None:
        """A stored response of this owner whose session is live; None otherwise."""

    def delete_response(self, owner: str, response_id: str) -> tuple[bool, str | None]:
        """Delete a stored response: (whether there was one, the session deleted with it:
        the last response of a chain that is no conversation takes its session along)."""

    def create_conversation(
        self,
        owner: str,
        conversation: ConversationRecord,
        messages: list[Message],
        *,
        system: Message | None = None,
    ) -> None:
        """A new conversation (a new session), with `messages` as its first turn if any."""

    def conversation(self, owner: str, conversation_id: str) -> ConversationRecord | None:
        """A live conversation of this owner; None otherwise."""

    def update_conversation(
        self, owner: str, conversation_id: str, metadata: dict[str, str]
    ) -> ConversationRecord | None:
        """Replace a live conversation's metadata; None when there is no such conversation."""

    def purge_expired(self) -> int:
        """Delete every session idle for longer than the TTL; returns how many."""

    def close(self) -> None: ...
