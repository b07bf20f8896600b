"""Session stores for the tests: SQLite in a temp folder, or a fresh database on a real
PostgreSQL server that the test session starts once (tests/support/cluster.py) and removes at the
end. `store_kind` parametrizes a test over both; `make_store` opens as many stores on the
same data as a test wants (two replicas sharing one database)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from launcher.netaddr import free_port
from launcher.proxy.store import SessionStore, SqliteStore
from launcher.proxy.store.postgres import PostgresStore
from support.cluster import FAST, PostgresServer

STORES = ("sqlite", "postgresql")
_numbers = itertools.count()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer(free_port(), settings=FAST).start()
    yield server
    server.remove()


@pytest.fixture
def pg_url(postgres: PostgresServer) -> str:
    """A new empty database for this test (its schema made by the store that opens it)."""
    return postgres.create_database(f"t{next(_numbers)}")


@pytest.fixture(params=STORES)
def store_kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def store_target(store_kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """What `--sessions-db` would say for this test's store: a file, or a database URL."""
    if store_kind == "sqlite":
        return str(tmp_path / "sessions.sqlite3")
    return request.getfixturevalue("pg_url")


@pytest.fixture
def make_store(store_target: str) -> Iterator[Callable[..., SessionStore]]:
    opened: list[SessionStore] = []

    def make(**options: Any) -> SessionStore:
        if store_target.startswith("postgresql://"):
            store: SessionStore = PostgresStore(store_target, **options)
        else:
            store = SqliteStore(store_target, **options)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


class Clock:
    """A clock a test moves by hand (`clock.now += 3601`), for the stores' TTL."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def turn(user: str, reply: str) -> list[dict]:
    """One turn's messages: the user's and the assistant's."""
    return [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
