"""A store shared by processes (replicas): what one commits the other reads, two writers on one
session never interleave, the schema is versioned and migrated once however many start at
once, and a PostgreSQL that goes away is a 503 that ends when it comes back."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
from support.cluster import PostgresServer

from launcher.errors import SessionConflictError, SessionStoreError, StoreUnavailableError
from launcher.netaddr import free_port
from launcher.proxy.store import NewTurn, OwnerUsage, SqliteStore, TurnRecord, migrations
from launcher.proxy.store.postgres import PostgresStore, describe


def turn(user: str, reply: str) -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]


def test_two_replicas_share_sessions_and_never_interleave_a_turn(make_store) -> None:
    a, b = make_store(), make_store()
    a.commit_turn("owner", "s", turn("one", "1"))
    assert b.load("owner", "s").turns == [turn("one", "1")]
    # both load the session, both generate; the first commit wins, the second is refused
    seen_a, seen_b = a.load("owner", "s"), b.load("owner", "s")
    assert a.commit("owner", "s", NewTurn(base=seen_a, keep=1, messages=turn("two", "2")))
    with pytest.raises(SessionConflictError) as refused:
        b.commit("owner", "s", NewTurn(base=seen_b, keep=1, messages=turn("deux", "2")))
    assert refused.value.status == 409 and refused.value.code == "session_conflict"
    assert b.load("owner", "s").turns == [turn("one", "1"), turn("two", "2")]
    # a new session created by both at once: one creates it, the other is refused
    new_a, new_b = a.load("owner", "new"), b.load("owner", "new")
    assert a.commit("owner", "new", NewTurn(base=new_a, keep=0, messages=turn("a", "A")))
    with pytest.raises(SessionConflictError):
        b.commit("owner", "new", NewTurn(base=new_b, keep=0, messages=turn("b", "B")))
    assert a.load("owner", "new").turns == [turn("a", "A")] and b.info("owner", "new").turns == 1
    # deleting still wins over a turn loaded before it (False, not a conflict)
    assert b.delete("owner", "s")
    assert a.commit("owner", "s", NewTurn(base=seen_a, keep=1, messages=turn("x", "y"))) is False


def test_the_schema_is_versioned_and_both_dialects_ship_the_same_versions(make_store) -> None:
    shipped = {
        d: [(m.version, m.name) for m in migrations.available(d)] for d in ("sqlite", "postgres")
    }  # noqa: E501
    assert shipped["sqlite"] == shipped["postgres"] and shipped["sqlite"][0] == (1, "sessions")
    versions = [m.version for m in migrations.available("sqlite")]
    assert versions == list(range(1, len(versions) + 1))
    store = make_store()
    with store._reading() as db:
        assert migrations.current_version(db) == versions[-1]
    make_store()  # opening it again applies nothing and fails nothing
    with store._reading() as db:
        rows = db.execute("SELECT version FROM llmup_schema").fetchall()
    assert [r[0] for r in rows] == versions


def test_a_database_made_by_a_newer_llmup_is_refused(make_store) -> None:
    store = make_store()
    with store._transaction() as db:
        db.execute(
            "INSERT INTO llmup_schema (version, name, applied) VALUES (?, ?, ?)", (99, "x", 0)
        )
    with pytest.raises(SessionStoreError, match="schema version 99, newer than this llmup"):
        make_store()


def test_a_file_of_the_first_releases_is_adopted(tmp_path) -> None:
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as db:  # the first release's schema: no epoch, no versions
        db.executescript(
            "CREATE TABLE sessions (owner TEXT NOT NULL, id TEXT NOT NULL, system TEXT, "
            "created REAL NOT NULL, updated REAL NOT NULL, turns INTEGER NOT NULL DEFAULT 0, "
            "PRIMARY KEY (owner, id));"
            "CREATE TABLE messages (owner TEXT NOT NULL, id TEXT NOT NULL, seq INTEGER NOT NULL, "
            "turn INTEGER NOT NULL, message TEXT NOT NULL, PRIMARY KEY (owner, id, seq));"
            "INSERT INTO sessions VALUES ('', 'kept', NULL, 1e12, 1e12, 1);"
            "INSERT INTO messages VALUES "
            """('', 'kept', 0, 0, '{"role": "user", "content": "hi"}');"""
        )
    store = SqliteStore(path, ttl_s=0)
    assert store.load("", "kept").messages() == [{"role": "user", "content": "hi"}]
    assert store.usage("") == OwnerUsage(1, len('{"role": "user", "content": "hi"}'))
    store.commit_turn("", "kept", turn("more", "ok"))
    assert store.info("", "kept").turns == 2
    store.close()


def test_a_file_of_the_last_unversioned_release_is_adopted_with_its_bytes(tmp_path) -> None:
    """llmup's store before versions added `epoch` and then `bytes` itself (and kept `bytes`
    up to date): such a file is taken at version 2, its counts kept, nothing added twice."""
    path = tmp_path / "unversioned.sqlite3"
    message = '{"role": "user", "content": "hé"}'
    with sqlite3.connect(path) as db:
        for statement in migrations.available("sqlite")[0].statements():
            db.execute(statement)
        db.execute("ALTER TABLE sessions ADD COLUMN bytes INTEGER NOT NULL DEFAULT 0")
        db.execute("INSERT INTO sessions VALUES ('k', 's', NULL, 1e12, 1e12, 1, 'e', ?)", (34,))
        db.execute("INSERT INTO messages VALUES ('k', 's', 0, 0, ?)", (message,))
    store = SqliteStore(path, ttl_s=0)
    with store._reading() as db:
        versions = db.execute("SELECT version FROM llmup_schema").fetchall()
    assert [r[0] for r in versions] == [1, 2, 3]
    assert store.usage("k") == OwnerUsage(1, 34) and len(message.encode()) == 34
    store.commit_turn("k", "s", turn("more", "ok"))
    assert store.usage("k").bytes == 34 + len(json.dumps(turn("more", "ok")[0]).encode()) + len(
        json.dumps(turn("more", "ok")[1]).encode()
    )
    store.close()


def test_the_bytes_migration_counts_what_was_stored_before_it(make_store) -> None:
    """A database at version 1 (sessions without their byte counts) gets them when a store
    opens it: the same counts every commit keeps up to date."""
    store = make_store(ttl_s=0)
    store.commit_turn("a", "s", turn("naïve", "1"), system={"role": "system", "content": "é"})
    reply = {"id": "r", "choices": [{"message": {"content": "ü ✓"}}]}
    rewind = NewTurn(
        base=store.load("a", "s"), keep=1, messages=turn("two", "2"), record=TurnRecord(reply=reply)
    )
    assert store.commit("a", "s", rewind)
    store.commit_turn("a", "t", turn("other", "x"))
    store.commit_turn("b", "u", turn("b", "y"))
    kept = {owner: store.usage(owner) for owner in ("a", "b")}
    with store._transaction() as db:  # back to version 1, as before the migration
        db.execute("DROP TABLE responses")
        db.execute("DROP TABLE conversations")
        db.execute("ALTER TABLE sessions DROP COLUMN bytes")
        db.execute("DELETE FROM llmup_schema WHERE version >= 2")
    store.close()
    reopened = make_store(ttl_s=0)
    assert {owner: reopened.usage(owner) for owner in ("a", "b")} == kept
    assert kept["a"].sessions == 2 and kept["a"].bytes > 0
    with reopened._reading() as db:
        assert migrations.current_version(db) == migrations.available("sqlite")[-1].version


def test_replicas_starting_at_once_migrate_once(pg_url) -> None:
    opened, errors = [], []

    def start() -> None:
        try:
            opened.append(PostgresStore(pg_url))
        except Exception as exc:  # the assertion below shows it
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(opened) == 4
    with opened[0]._reading() as db:
        assert db.execute("SELECT COUNT(*) FROM llmup_schema").fetchone()[0] == len(
            migrations.available("postgres")
        )
    for store in opened:
        store.close()


def test_password_from_a_file_and_a_wrong_one_said_without_it(postgres, tmp_path) -> None:
    url = postgres.create_database("pwfile")
    bare = url.replace(":llmup-test-password@", "@")
    secret = tmp_path / "password"
    secret.write_text("llmup-test-password\n")
    store = PostgresStore(bare, password=secret.read_text().splitlines()[0])
    store.commit_turn("", "s", turn("hi", "ho"))
    store.close()
    with pytest.raises(SessionStoreError) as refused:
        PostgresStore(bare, password="wrong-password", timeout_s=3)
    message = str(refused.value)
    assert "cannot open the session store postgresql://postgres@127.0.0.1" in message
    assert "wrong-password" not in message and "password authentication failed" in message
    assert describe(url) == f"postgresql://postgres@127.0.0.1:{postgres.port}/pwfile"


def eventually(call, timeout: float = 60):
    """`call()`'s result once it stops raising StoreUnavailableError (polled, not timed)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except StoreUnavailableError:
            assert time.monotonic() < deadline, "the store did not come back"
            time.sleep(0.2)


def test_database_down_is_503_with_retry_after_and_service_resumes() -> None:
    server = PostgresServer(free_port()).start()
    try:
        url = server.create_database("flaky")
        store = PostgresStore(url, timeout_s=2, retry_after_s=3)
        store.commit_turn("", "s", turn("one", "1"))
        server.stop("fast")  # connections are cut, nothing answers on the port
        for call in (
            lambda: store.load("", "s"),
            lambda: store.commit_turn("", "s", turn("2", "2")),
        ):
            with pytest.raises(StoreUnavailableError) as down:
                call()
            assert down.value.status == 503 and down.value.headers == {"Retry-After": "3"}
        server.start()
        assert eventually(lambda: store.load("", "s")).turns == [turn("one", "1")]  # by itself
        store.commit_turn("", "s", turn("two", "2"))
        assert store.info("", "s").turns == 2
        store.close()
    finally:
        server.remove()


def test_the_default_store_does_not_import_the_postgresql_driver(tmp_path) -> None:
    code = (
        "import sys\n"
        "from launcher.settings import Settings\n"
        "from launcher.proxy import create_app, open_store\n"
        f"store = open_store(Settings(home={str(tmp_path)!r}))\n"
        "store.commit_turn('', 's', [{'role': 'user', 'content': 'hi'}])\n"
        "print(store.kind, 'psycopg' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.split() == ["sqlite", "False"], done.stderr
