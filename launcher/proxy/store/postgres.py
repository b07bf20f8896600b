"""The session store in PostgreSQL, shared by every replica (`--sessions-db postgresql://...`).

psycopg 3 with its connection pool: connections are checked before use (a database that
restarted costs no request), every wait is bounded (a connection from the pool, the connect
itself, each statement), and a database that cannot be reached is a `StoreUnavailableError`
(503 with Retry-After), so a turn is refused before it is generated or, after, reported as
not stored; a transaction is never left half-done. When the database answers again the pool
reconnects by itself. Reads of a session run in one REPEATABLE READ snapshot; a turn's claim
locks the session's row (`FOR UPDATE`), so two replicas committing to one session serialize
and the second finds it changed (409) instead of interleaving. A full disk on the database
server is a `StorageFullError` (507), as with SQLite.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool, PoolTimeout

from launcher.errors import (
    SessionConflictError,
    SessionStoreError,
    StorageFullError,
    StoreUnavailableError,
)
from launcher.proxy.store import migrations
from launcher.proxy.store.sql import DEFAULT_TTL_S, Cursor, SqlStore

log = logging.getLogger(__name__)


def describe(url: str) -> str:
    """The database's address without its password (for messages and logs)."""
    try:
        info = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql://(unparsable address)"
    user = f"{info['user']}@" if info.get("user") else ""
    where = f"{info.get('host', '')}:{info.get('port', 5432)}"
    return f"postgresql://{user}{where}/{info.get('dbname', '')}"


@lru_cache(maxsize=64)
def _placeholders(sql: str) -> str:
    """The shared SQL's `?` placeholders as psycopg's `%s`."""
    return sql.replace("?", "%s")


class _Connection:
    """A psycopg connection speaking the shared SQL (see `launcher.proxy.store.sql.Db`)."""

    def __init__(self, conn: psycopg.Connection) -> None:
        self.conn = conn

    def execute(self, sql: str, params: Iterable[Any] = ()) -> Cursor:
        args = tuple(params)
        return self.conn.execute(_placeholders(sql), args or None)

    def executemany(self, sql: str, rows: Iterable[Iterable[Any]]) -> None:
        with self.conn.cursor() as cursor:
            cursor.executemany(_placeholders(sql), [tuple(r) for r in rows])


class PostgresStore(SqlStore):
    """Sessions in a PostgreSQL database; the schema is migrated when the store opens."""

    kind = "postgresql"
    for_update = " FOR UPDATE"

    def __init__(
        self,
        url: str,
        *,
        ttl_s: float = DEFAULT_TTL_S,
        clock: Callable[[], float] = time.time,
        password: str | None = None,
        pool_size: int = 8,
        timeout_s: float = 5.0,
        retry_after_s: int = 2,
        application_name: str = "llmup",
    ) -> None:
        super().__init__(ttl_s=ttl_s, clock=clock)
        self.address = describe(url)
        self.retry_after_s = retry_after_s
        options = _connect_options(password, timeout_s, application_name)
        self._pool = ConnectionPool(
            url,
            kwargs=options,
            min_size=1,
            max_size=pool_size,
            timeout=timeout_s,
            # a lost connection is retried with the pool's backoff only this long; then the
            # next request starts a fresh attempt, so a database back up is used within seconds
            reconnect_timeout=max(timeout_s, 2.0),
            check=ConnectionPool.check_connection,
            name="llmup-sessions",
            open=False,
        )
        try:
            psycopg.connect(url, **options).close()  # libpq's own reason when it cannot
            self._pool.open(wait=True, timeout=timeout_s)
            with self._transaction() as db:
                version = migrations.upgrade(db, "postgres")
        except (PoolTimeout, StoreUnavailableError, psycopg.Error) as exc:
            self._pool.close()
            raise SessionStoreError(
                f"cannot open the session store {self.address}: {_reason(exc)}; check that "
                "PostgreSQL runs and the address, user and password are right"
            ) from exc
        except BaseException:
            self._pool.close()
            raise
        log.info("session store: %s at schema version %d", self.address, version)
        self.purge_expired()

    def close(self) -> None:
        self._pool.close()

    @contextmanager
    def _transaction(self) -> Iterator[_Connection]:
        with self._errors(), self._pool.connection() as conn, conn.transaction():
            yield _Connection(conn)

    @contextmanager
    def _reading(self) -> Iterator[_Connection]:
        """One REPEATABLE READ snapshot, in pipeline mode: the queries of a read go out
        together and their results come back in one round trip."""
        pool = self._pool
        with self._errors(), pool.connection() as conn, conn.pipeline(), conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            yield _Connection(conn)

    def json_text(self, column: str, key: str) -> str:
        return f"({column}::json ->> '{key}')"

    def byte_length(self, expr: str) -> str:
        return f"octet_length(CAST({expr} AS TEXT))"  # a bare parameter is typed unknown

    def check_space(self) -> None:
        """Nothing to check here: the database's disk is its server's (a full one is a 507
        from the commit, with nothing stored)."""

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """psycopg's errors as llmup's: a full disk, a conflict, a database not answering."""
        try:
            yield
        except pg_errors.DiskFull as exc:
            log.error("the session store %s is on a full disk: %s", self.address, exc)
            raise StorageFullError(
                "the conversation could not be stored: the session database's disk is full; "
                "nothing was stored, retry once space is freed"
            ) from exc
        except pg_errors.UniqueViolation as exc:  # two replicas created one session at once
            raise SessionConflictError(
                "the session was created by another request while this reply was generated; "
                "this turn was not stored: send it again",
                param="session_id",
            ) from exc
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            log.warning("session store %s unavailable: %s", self.address, _reason(exc))
            raise StoreUnavailableError(
                f"the session store (PostgreSQL) is not answering: {_reason(exc)}; nothing was "
                f"stored, retry in {self.retry_after_s} s",
                headers={"Retry-After": str(self.retry_after_s)},
            ) from exc


def _connect_options(password: str | None, timeout_s: float, name: str) -> dict[str, Any]:
    """libpq options of every connection: autocommit (transactions are explicit), bounded
    connect and statement times, and a name that shows in pg_stat_activity."""
    statement_ms = int(timeout_s * 1000)
    options = {
        "autocommit": True,
        "connect_timeout": max(1, math.ceil(timeout_s)),
        "application_name": name[:63],
        "options": f"-c statement_timeout={statement_ms} "
        f"-c idle_in_transaction_session_timeout={4 * statement_ms}",
    }
    if password is not None:
        options["password"] = password
    return options


def _reason(exc: BaseException) -> str:
    """The first line of a driver's message (libpq's carry the host's details after it)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
