"""Versioned schema migrations for the session stores, applied at start.

Each dialect has a folder of numbered SQL files (`sqlite/0001_sessions.sql`,
`postgres/0001_sessions.sql`, ...): version N is the file whose name starts with N, and both
folders hold the same versions (a test checks). `upgrade` applies, in one transaction
that the caller opens, every version above the one recorded in the `llmup_schema` table,
and records each. On PostgreSQL it first takes a transaction-scoped advisory lock, so two
replicas starting at once apply a migration once: the second waits, then finds nothing left
to do. On SQLite the caller's `BEGIN IMMEDIATE` serializes the same way.

A new table (stored responses, conversations) is a new numbered file in both folders; no
code changes here. A database at a version this llmup does not know (made by a newer one)
is refused at start rather than half understood.

Why not alembic: it works through SQLAlchemy, which the stores do not use (their SQL is the
drivers' own), and its import would be paid by every start with the default SQLite store;
an ordered list of SQL files under a lock is all the stores need.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any

from launcher.errors import SessionStoreError

log = logging.getLogger(__name__)

DIALECTS = ("sqlite", "postgres")
# pg_advisory_xact_lock's key for "llmup is migrating the session schema" (any constant
# shared by every llmup; this one spells "llmup-sc" in ASCII)
ADVISORY_LOCK = 0x6C6C6D75702D7363
VERSION_TABLE = (
    "CREATE TABLE IF NOT EXISTS llmup_schema (version INTEGER PRIMARY KEY, "
    "name TEXT NOT NULL, applied DOUBLE PRECISION NOT NULL)"
)
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    def statements(self) -> list[str]:
        """The file's statements (comments dropped; the files hold no `;` inside strings)."""
        text = "\n".join(ln for ln in self.sql.splitlines() if not ln.lstrip().startswith("--"))
        return [s.strip() for s in text.split(";") if s.strip()]


def available(dialect: str) -> list[Migration]:
    """Every migration shipped for `dialect`, in version order."""
    folder = resources.files(__name__).joinpath(dialect)
    found = []
    for entry in folder.iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), match.group(2), entry.read_text()))
    return sorted(found, key=lambda m: m.version)


def current_version(db: Any) -> int:
    row = db.execute("SELECT COALESCE(MAX(version), 0) FROM llmup_schema").fetchone()
    return int(row[0])


def upgrade(db: Any, dialect: str) -> int:
    """Bring the schema up to the newest version, inside the caller's transaction; returns
    the version it is at."""
    if dialect == "postgres":
        db.execute("SELECT pg_advisory_xact_lock(?)", (ADVISORY_LOCK,))
    db.execute(VERSION_TABLE)
    migrations = available(dialect)
    newest = migrations[-1].version if migrations else 0
    version = current_version(db)
    if version > newest:
        raise SessionStoreError(
            f"the session store is at schema version {version}, newer than this llmup knows "
            f"({newest}): it was upgraded by a newer llmup; run that version (or a newer one)"
        )
    adopted = _adopt_unversioned(db) if version == 0 and dialect == "sqlite" else 0
    for migration in migrations:
        if migration.version > version:
            if migration.version > adopted:  # else the file already has what it makes
                for statement in migration.statements():
                    db.execute(statement)
            db.execute(
                "INSERT INTO llmup_schema (version, name, applied) VALUES (?, ?, ?)",
                (migration.version, migration.name, time.time()),
            )
            log.info("session store schema: applied %04d_%s", migration.version, migration.name)
    return max(version, newest)


def _adopt_unversioned(db: Any) -> int:
    """Bring a file made before versions (llmup's first releases, whose store added columns
    itself) to a version's schema; returns that version, whose migrations are recorded
    without running them again. Those files may lack the `epoch` column that migration 1
    declares (its CREATE TABLE IF NOT EXISTS leaves their table as it is); the last of them
    kept the `bytes` column of migration 2 up to date already."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(sessions)").fetchall()}
    if columns and "epoch" not in columns:
        db.execute("ALTER TABLE sessions ADD COLUMN epoch TEXT NOT NULL DEFAULT ''")
    return 2 if "bytes" in columns else 0
