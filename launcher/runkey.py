"""The per-run backend key: the environment variable it reaches a worker in, and how one is
made.

Every backend llmup starts gets a random key of its own; the worker reads it from `KEY_ENV`
(never from its command line, which any local user can read in /proc) and refuses a request
without it. Here, apart from `protocol`, so that starting a backend imports no pydantic.
"""

from __future__ import annotations

import secrets

KEY_ENV = "LLMUP_BACKEND_KEY"


def new_backend_key() -> str:
    """256 random bits, URL-safe: one per backend run, known only to the proxy."""
    return secrets.token_urlsafe(32)
