"""The OpenAI-compatible proxy: routes, sessions, API keys, limits and metrics.

Only `create_app` imports FastAPI; `check_bind` and the session store are usable without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from launcher.proxy.auth import check_bind
from launcher.proxy.store import SessionStore, SqliteStore, open_store
from launcher.served import ServedModel, StaticBackend

if TYPE_CHECKING:
    from fastapi import FastAPI

    from launcher.settings import Settings

__all__ = [
    "SessionStore",
    "SqliteStore",
    "StaticBackend",
    "check_bind",
    "create_app",
    "open_store",
    "warm_up",
]


def create_app(settings: Settings, backend: ServedModel, sessions: SessionStore) -> FastAPI:
    """See `launcher.proxy.app.create_app` (imported here lazily: it pulls in FastAPI)."""
    from launcher.proxy.app import create_app as build

    return build(settings, backend, sessions)


def warm_up(app: FastAPI) -> None:
    """See `launcher.proxy.app.warm_up` (imported lazily, as create_app is)."""
    from launcher.proxy.app import warm_up as warm

    warm(app)
