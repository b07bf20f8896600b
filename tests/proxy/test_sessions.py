"""The session stores on their own, each test on SQLite and on a real PostgreSQL: turns, the
system message, owners, expiry, atomicity, deletes, rewinds and each owner's usage (sessions
and stored bytes, the per-key limits)."""

from __future__ import annotations

import json
import os
import sqlite3
import stat

import pytest
from support.store_fixtures import Clock, turn

from launcher.errors import BadRequestError
from launcher.proxy.context import TurnPlan, plan_turn
from launcher.proxy.store import (
    Conversation,
    NewTurn,
    OwnerUsage,
    SessionStore,
    SqliteStore,
    TurnRecord,
)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(make_store, clock) -> SessionStore:
    return make_store(ttl_s=3600, clock=clock)


def test_turns_are_kept_in_order_with_the_system_message_first(store) -> None:
    system = {"role": "system", "content": "be brief"}
    store.commit_turn("", "s", turn("one", "1"), system=system)
    store.commit_turn("", "s", turn("two", "2"))
    history = store.load("", "s")
    assert history.system == system
    assert history.turns == [turn("one", "1"), turn("two", "2")]
    assert history.messages()[0] == system and len(history.messages()) == 5
    # a new system message replaces the old one and still comes first
    store.commit_turn("", "s", turn("three", "3"), system={"role": "system", "content": "new"})
    assert store.load("", "s").messages()[0]["content"] == "new"
    info = store.info("", "s")
    assert info.turns == 3 and info.messages == 7


def test_wal_mode_and_survives_reopening(tmp_path, clock) -> None:
    path = tmp_path / "sessions.sqlite3"
    first = SqliteStore(path, clock=clock)
    first.commit_turn("", "kept", turn("hi", "hello"))
    first.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    second = SqliteStore(path, clock=clock)
    assert second.load("", "kept").turns == [turn("hi", "hello")]
    second.close()


def test_owners_never_see_each_other(store) -> None:
    store.commit_turn("owner-a", "same", turn("a's secret", "ok"))
    assert store.load("owner-b", "same") == Conversation()
    assert store.info("owner-b", "same") is None
    assert store.list_sessions("owner-b") == []
    assert store.delete("owner-b", "same") is False
    assert store.load("owner-a", "same").turns == [turn("a's secret", "ok")]


def test_a_failed_commit_leaves_the_session_as_it_was(store) -> None:
    store.commit_turn("", "s", turn("one", "1"))
    unstorable = [{"role": "user", "content": "two"}, {"role": "assistant", "content": object()}]
    with pytest.raises(TypeError):
        store.commit_turn("", "s", unstorable)
    history = store.load("", "s")
    assert history.turns == [turn("one", "1")] and store.info("", "s").turns == 1
    with pytest.raises(TypeError):  # nor does a first turn leave an empty session behind
        store.commit_turn("", "fresh", unstorable)
    assert store.info("", "fresh") is None and store.count() == 1


def test_idle_sessions_expire_after_the_ttl(store, clock) -> None:
    store.commit_turn("", "old", turn("hi", "hello"))
    clock.now += 1800
    store.commit_turn("", "young", turn("hi", "hello"))
    clock.now += 1801  # "old" idle for 3601 s, "young" for 1801 s
    assert store.load("", "old") == Conversation()
    assert [s.id for s in store.list_sessions("")] == ["young"]
    assert store.count() == 1
    # using an expired id starts it afresh, without the old turns
    store.commit_turn("", "old", turn("again", "fresh"))
    assert store.load("", "old").turns == [turn("again", "fresh")]
    clock.now += 7200
    assert store.purge_expired() == 2 and store.count() == 0


def test_delete(store) -> None:
    store.commit_turn("", "s", turn("hi", "hello"))
    assert store.delete("", "s") is True
    assert store.load("", "s") == Conversation() and store.delete("", "s") is False


def test_a_turn_is_not_stored_into_a_session_deleted_meanwhile(store) -> None:
    store.commit_turn("", "s", turn("one", "1"))
    loaded = store.load("", "s")
    assert store.delete("", "s")
    late = NewTurn(base=loaded, keep=1, messages=turn("two", "2"))
    assert store.commit("", "s", late) is False
    assert store.load("", "s") == Conversation() and store.info("", "s") is None
    # nor into one deleted and started again (a new epoch)
    store.commit_turn("", "s", turn("fresh", "f"))
    assert store.commit("", "s", late) is False
    assert store.load("", "s").turns == [turn("fresh", "f")]


def test_a_rewinding_commit_replaces_the_later_turns_atomically(store) -> None:
    for word in ("one", "two", "three"):
        store.commit_turn("", "s", turn(word, word[0]))
    base = store.load("", "s")
    record = TurnRecord(tokens=9, request="digest", reply={"id": "x"})
    store.commit("", "s", NewTurn(base=base, keep=1, messages=turn("TWO", "T"), record=record))
    history = store.load("", "s")
    assert history.turns == [turn("one", "o"), turn("TWO", "T")]
    assert history.records[1] == record and history.records[0].tokens is None
    assert store.info("", "s").turns == 2 and store.info("", "s").messages == 4


def test_ttl_zero_keeps_sessions_forever(make_store, clock) -> None:
    forever = make_store(ttl_s=0, clock=clock)
    forever.commit_turn("", "s", turn("hi", "hello"))
    clock.now += 10 * 365 * 86400
    assert forever.purge_expired() == 0 and forever.load("", "s").turns == [turn("hi", "hello")]


def stored(*values: object) -> int:
    """UTF-8 bytes of values stored as llmup stores them (JSON, non-ASCII kept as is)."""
    return sum(len(json.dumps(v, ensure_ascii=False).encode("utf-8")) for v in values)


def test_usage_counts_each_owners_sessions_and_stored_bytes(store, clock) -> None:
    assert store.usage("a") == OwnerUsage(0, 0)
    system = {"role": "system", "content": "réponds brièvement"}  # bytes, not characters
    first, second = turn("naïve ✓", "1"), turn("two", "2")
    store.commit_turn("a", "s", first, system=system)
    store.commit_turn("a", "s", second)
    store.commit_turn("a", "t", turn("other", "x"))
    store.commit_turn("b", "s", turn("b's own", "y"))
    in_s = stored(system, *first, *second)
    in_t = stored(*turn("other", "x"))
    assert store.usage("a") == OwnerUsage(2, in_s + in_t)
    assert store.usage("b") == OwnerUsage(1, stored(*turn("b's own", "y")))
    # a rewind frees the replaced turns; the reply kept for retries counts; a new system
    # message replaces the old one's bytes
    reply = {"id": "chatcmpl-1", "choices": [{"message": {"content": "ü"}}]}
    new_system = {"role": "system", "content": "short"}
    rewind = NewTurn(
        base=store.load("a", "s"), keep=0, messages=turn("again", "3"), system=new_system,
        record=TurnRecord(tokens=5, request="d", reply=reply),
    )  # fmt: skip
    assert store.commit("a", "s", rewind)
    now_s = stored(new_system, *turn("again", "3"), reply)
    assert store.usage("a") == OwnerUsage(2, now_s + in_t)
    assert store.delete("a", "t") and store.usage("a") == OwnerUsage(1, now_s)
    clock.now += 3601  # expired sessions count for nothing, and are gone when used again
    assert store.usage("a") == OwnerUsage(0, 0)
    store.commit_turn("a", "s", turn("fresh", "f"))
    assert store.usage("a") == OwnerUsage(1, stored(*turn("fresh", "f")))


def test_a_failed_commit_changes_no_usage(store) -> None:
    store.commit_turn("", "s", turn("one", "1"))
    before = store.usage("")
    unstorable = [{"role": "user", "content": "two"}, {"role": "assistant", "content": object()}]
    with pytest.raises(TypeError):
        store.commit("", "s", NewTurn(base=store.load("", "s"), keep=0, messages=unstorable))
    assert store.usage("") == before


def test_an_sqlite_file_is_private_whatever_the_umask(tmp_path) -> None:
    """`--sessions-db FILE` outside the home too: its folder 0700, the file, WAL and SHM 0600."""
    path = tmp_path / "elsewhere" / "deeper" / "sessions.sqlite3"
    previous = os.umask(0o022)
    try:
        store = SqliteStore(path)
        store.commit_turn("", "s", turn("private", "yes"))
    finally:
        os.umask(previous)
    try:
        files = [path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")]
        assert {f.name: oct(stat.S_IMODE(f.stat().st_mode)) for f in files} == {
            f.name: "0o600" for f in files
        }
        for folder in (path.parent, path.parent.parent):
            assert oct(stat.S_IMODE(folder.stat().st_mode)) == "0o700"
    finally:
        store.close()


def test_plan_turn_lines_requests_up_with_the_history() -> None:
    system = {"role": "system", "content": "sys"}
    history = Conversation(
        system=system, turns=[turn("one", " 1"), turn("two", "2")], epoch="e",
        records=[TurnRecord(), TurnRecord(request="last", reply={"id": "r"})],
    )  # fmt: skip
    new = {"role": "user", "content": "three"}
    assert plan_turn(history, [new], "x") == TurnPlan(None, [new], keep=2)
    # the whole history resent, the reply's whitespace trimmed: only the new message is new
    trimmed = [system, *turn("one", "1"), *turn("two", "2 "), new]
    assert plan_turn(history, trimmed, "x") == TurnPlan(None, [new], keep=2)
    # an edited earlier message: the client's version from that turn on
    edited = [*turn("one", "1"), {"role": "user", "content": "TWO"}]
    assert plan_turn(history, edited, "x") == TurnPlan(None, edited[2:], keep=1)
    # a changed system message replaces the stored one
    other = {"role": "system", "content": "other"}
    assert plan_turn(history, [other, new], "x").system == other
    # the request that made the last turn, again, as a retry: its stored reply
    assert plan_turn(history, [new], "last", retrying=True).retry == {"id": "r"}
    assert plan_turn(history, [new], "last").retry is None  # the same message, sent again
    assert plan_turn(history, [*turn("one", "1"), new], "last").retry == {"id": "r"}
    # one message is always new, even one that repeats the first
    assert plan_turn(history, [{"role": "user", "content": "one"}], "x").keep == 2
    with pytest.raises(BadRequestError, match="no new message"):
        plan_turn(history, [system, *turn("one", "1"), *turn("two", "2")], "x")
