"""The SQLite session store on its own: turns, the system message, owners, expiry, atomicity."""

from __future__ import annotations

import sqlite3

import pytest

from launcher.errors import BadRequestError
from launcher.proxy.context import split_new
from launcher.proxy.sessions import Conversation, SessionStore


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def turn(user: str, reply: str) -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path, clock) -> SessionStore:
    s = SessionStore(tmp_path / "sessions.sqlite3", ttl_s=3600, clock=clock)
    yield s
    s.close()


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
    first = SessionStore(path, clock=clock)
    first.commit_turn("", "kept", turn("hi", "hello"))
    first.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    second = SessionStore(path, clock=clock)
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


def test_split_new_accepts_only_the_new_part_or_the_whole_history() -> None:
    system = {"role": "system", "content": "sys"}
    history = Conversation(system=system, turns=[turn("one", "1")])
    new = {"role": "user", "content": "two"}
    assert split_new(history, [new]).messages == [new]
    whole = split_new(history, [system, *turn("one", "1"), new])
    assert whole.messages == [new] and whole.system is None  # unchanged system not re-sent
    changed = split_new(history, [{"role": "system", "content": "other"}, new])
    assert changed.system == {"role": "system", "content": "other"}
    # a different past is new content, kept as sent (nothing silently merged)
    diverged = [*turn("not one", "x"), new]
    assert split_new(history, diverged).messages == diverged
    with pytest.raises(BadRequestError, match="no new message"):
        split_new(history, [system, *turn("one", "1")])
