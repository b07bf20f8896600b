"""The Responses and Conversations APIs' records in the session stores, each test on SQLite
and on a real PostgreSQL: a response is a turn of its session and goes with it (deleted,
rewound, expired), a branch copies its base's turns in the transaction of its first turn,
the last response of a chain takes its session along, another owner finds nothing."""

from __future__ import annotations

import sqlite3

import pytest
from support.store_fixtures import Clock, turn

from launcher.errors import SessionConflictError
from launcher.proxy.store import (
    Conversation,
    ConversationRecord,
    NewTurn,
    ResponseRecord,
    SessionStore,
    TurnRecord,
)


def record(rid: str, text: str = "x") -> ResponseRecord:
    return ResponseRecord(rid, 1.0, {"id": rid, "output_text": text}, [{"type": "message"}])


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(make_store, clock) -> SessionStore:
    return make_store(ttl_s=3600, clock=clock)


def add(store: SessionStore, session: str, user: str, reply: str, rid: str, keep=None) -> bool:
    base = store.load("o", session)
    keep = len(base.turns) if keep is None else keep
    new = NewTurn(base, keep, turn(user, reply), response=record(rid, reply))
    return store.commit("o", session, new)


def test_a_response_is_a_turn_of_its_session(store) -> None:
    assert add(store, "chain", "one", "1", "r1") and add(store, "chain", "two", "2", "r2")
    found = store.response("o", "r2")
    assert (found.session, found.turn, found.record.body["output_text"]) == ("chain", 1, "2")
    assert found.record.input == [{"type": "message"}] and found.record.created == 1.0
    assert store.response("other", "r2") is None and store.response("o", "nope") is None
    usage = store.usage("o").bytes
    assert usage > sum(len(str(m)) for m in turn("one", "1") + turn("two", "2"))
    # a rewind of the session (a client editing turn 1 through chat) drops the response too
    rewind = NewTurn(store.load("o", "chain"), 1, turn("deux", "2"))
    assert store.commit("o", "chain", rewind)
    assert store.response("o", "r2") is None and store.response("o", "r1") is not None
    assert store.usage("o").bytes < usage


def test_a_branch_copies_the_turns_it_starts_from_with_its_first_turn(store) -> None:
    system = {"role": "system", "content": "be brief"}
    store.commit_turn("o", "chain", turn("one", "1"), system=system)
    add(store, "chain", "two", "2", "r2")
    base = store.load("o", "chain")
    branch = Conversation(base.system, base.turns[:1], base.records[:1])  # no epoch: new
    new = NewTurn(branch, 1, turn("zwei", "Z"), response=record("b2"))
    assert store.commit("o", "branch", new)
    copied = store.load("o", "branch")
    assert copied.system == system and copied.turns == [turn("one", "1"), turn("zwei", "Z")]
    assert store.load("o", "chain").turns == base.turns  # the original is untouched
    assert store.response("o", "b2").session == "branch"
    assert store.info("o", "branch").turns == 2


def test_a_failed_branch_leaves_nothing(store) -> None:
    add(store, "chain", "one", "1", "r1")
    base = store.load("o", "chain")
    bad = NewTurn(Conversation(None, base.turns, base.records), 1, turn("x", "y"),
                  response=record("r1"))  # fmt: skip
    with pytest.raises((sqlite3.IntegrityError, SessionConflictError)):  # the id is taken
        store.commit("o", "branch", bad)
    assert store.load("o", "branch") == Conversation() and store.usage("o").sessions == 1


def test_deleting_the_last_response_of_a_chain_deletes_its_session(store) -> None:
    add(store, "chain", "one", "1", "r1")
    add(store, "chain", "two", "2", "r2")
    assert store.delete_response("other", "r1") == (False, None)
    assert store.delete_response("o", "r2") == (True, None)
    assert store.response("o", "r2") is None and store.load("o", "chain").turns
    assert store.delete_response("o", "r1") == (True, "chain")
    assert store.load("o", "chain") == Conversation() and store.usage("o").bytes == 0


def test_responses_expire_with_their_session(store, clock) -> None:
    add(store, "chain", "one", "1", "r1")
    clock.now += 3601
    assert store.response("o", "r1") is None
    assert store.purge_expired() == 1
    with store._reading() as db:
        assert db.execute("SELECT COUNT(*) FROM responses").fetchone()[0] == 0


def test_a_conversation_is_a_session_with_metadata(store, clock) -> None:
    conv = ConversationRecord("c1", clock.now, {"topic": "demo"})
    store.create_conversation("o", conv, [{"role": "user", "content": "hello"}])
    assert store.conversation("o", "c1") == conv and store.conversation("x", "c1") is None
    assert store.load("o", "c1").turns == [[{"role": "user", "content": "hello"}]]
    assert [s.id for s in store.list_sessions("o")] == ["c1"]
    assert store.info("o", "c1").title == "hello" and store.usage("o").bytes > 0
    updated = store.update_conversation("o", "c1", {"topic": "other"})
    assert updated.metadata == {"topic": "other"}
    assert store.update_conversation("x", "c1", {}) is None
    # a response in the conversation is a turn of it; deleting it keeps the conversation
    add(store, "c1", "more", "ok", "r1")
    assert store.delete_response("o", "r1") == (True, None)
    empty = ConversationRecord("c2", clock.now, {})
    store.create_conversation("o", empty, [])
    assert store.load("o", "c2").epoch is not None and store.load("o", "c2").turns == []
    store.commit_turn("o", "c2", turn("first", "1"))
    assert store.info("o", "c2").turns == 1
    assert store.delete("o", "c1") and store.conversation("o", "c1") is None
    clock.now += 3601
    assert store.conversation("o", "c2") is None


def test_records_of_a_copied_turn_are_kept(store) -> None:
    reply = {"id": "chatcmpl-1", "choices": []}
    base = store.load("o", "s")
    store.commit("o", "s", NewTurn(base, 0, turn("a", "b"), record=TurnRecord(5, "d", reply)))
    loaded = store.load("o", "s")
    store.commit("o", "t", NewTurn(Conversation(None, loaded.turns, loaded.records), 1,
                                   turn("c", "d")))  # fmt: skip
    assert store.load("o", "t").records[0] == TurnRecord(5, "d", reply)
