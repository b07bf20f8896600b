"""Session stores: one interface (`base.SessionStore`), two implementations.

SQLite under the llmup home is the default (`sqlite.SqliteStore`); `--sessions-db
postgresql://...` (`LLMUP_PROXY__SESSIONS_DB`) keeps sessions in PostgreSQL instead
(`postgres.PostgresStore`), where several replicas share them. The PostgreSQL driver is
imported only when one is asked for, so the default costs no import of it.
"""

from __future__ import annotations

from importlib import import_module
from pathlib import Path

from launcher.errors import SessionStoreError
from launcher.proxy.store.base import (
    Conversation,
    ConversationRecord,
    Message,
    NewTurn,
    OwnerUsage,
    ResponseRecord,
    SessionInfo,
    SessionStore,
    StoredResponse,
    TurnRecord,
    turn_bytes,
)
from launcher.proxy.store.sqlite import DB_NAME, SqliteStore
from launcher.settings import POSTGRES_SCHEMES, Settings

__all__ = [
    "Conversation",
    "ConversationRecord",
    "Message",
    "NewTurn",
    "OwnerUsage",
    "ResponseRecord",
    "SessionInfo",
    "SessionStore",
    "SqliteStore",
    "StoredResponse",
    "TurnRecord",
    "open_store",
    "turn_bytes",
]


def open_store(settings: Settings) -> SessionStore:
    """The store the settings name: PostgreSQL for a postgresql:// URL, else SQLite (the
    file `sessions_db` names, or sessions.sqlite3 under the llmup home)."""
    proxy = settings.proxy
    target = proxy.sessions_db
    if target and target.startswith(POSTGRES_SCHEMES):
        postgres = import_module("launcher.proxy.store.postgres")
        password = None
        if proxy.sessions_db_password_file is not None:
            password = read_password(proxy.sessions_db_password_file)
        return postgres.PostgresStore(
            target,
            ttl_s=proxy.session_ttl,
            password=password,
            pool_size=proxy.sessions_db_pool_size,
            timeout_s=proxy.sessions_db_timeout_s,
            retry_after_s=proxy.retry_after_s,
            application_name=f"llmup {proxy.replica_name}",
        )
    path = Path(target).expanduser() if target else Path(settings.home) / DB_NAME
    return SqliteStore(path, ttl_s=proxy.session_ttl)


def read_password(path: Path) -> str:
    """A docker secret's password: the file's first line."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise SessionStoreError(
            f"cannot read the session database's password file {path}: {exc.strerror}; fix "
            "LLMUP_PROXY__SESSIONS_DB_PASSWORD_FILE"
        ) from exc
    return lines[0] if lines else ""
