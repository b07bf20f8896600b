"""Shared fixtures: every cache and home folder points at a temp dir, never at ~."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from support.serving import Served, kill_leftovers

DATA = Path(__file__).parent / "data"
MACHINES = DATA / "machines"

# The real-backend fixtures (tiny_backend, make_proxy) and the session stores (SQLite, a real
# PostgreSQL) for every module that asks for them.
pytest_plugins = [
    "support.backend_fixtures",
    "support.hub_fixtures",
    "support.store_fixtures",
    "support.api_fixtures",
]


@pytest.fixture(autouse=True)
def _isolated_homes(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("LLMUP_HOME", str(home / "llmup"))
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    for key in [k for k in os.environ if k.startswith("LLMUP_") and k != "LLMUP_HOME"]:
        monkeypatch.delenv(key)
    # The shipped pins name commits of the real hub; the local test hub has its own.
    monkeypatch.setenv("LLMUP_PINS_FILE", str(home / "no-shipped-pins.json"))


@pytest.fixture(autouse=True)
def _no_server_left_behind():
    # servers of wider-scoped fixtures are set up before this one and outlive the test
    already_running = len(Served.started)
    yield
    kill_leftovers(already_running)


def run_cli(
    *args: str, env: dict | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    """Run `python -m launcher ARGS` as a user would, capturing both streams."""
    return subprocess.run(
        [sys.executable, "-m", "launcher", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200", **(env or {})},  # a test may ask for a width
    )
