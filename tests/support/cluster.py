"""Real PostgreSQL and HAProxy servers, started and stopped by the tests (and the scale-out
benchmark) themselves: Debian's `postgresql` (15) and `haproxy` (2.6) packages, on loopback
ports, in temp folders.

PostgreSQL refuses to run as root, so as root its commands run as the `postgres` user the
Debian package creates (`runuser`); otherwise as the current user. Its binaries are found on
the PATH or under /usr/lib/postgresql/*/bin (where Debian puts them). Missing packages are
an error that says what to install, not a skip.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
HAPROXY_CFG = ROOT / "docker" / "haproxy.cfg"
PG_SUPERUSER = "postgres"
PG_PASSWORD = "llmup-test-password"
# durability does not matter to the tests (they kill llmup, never the database): skip fsync
FAST = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}


def pg_binary(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    candidates = glob.glob(f"/usr/lib/postgresql/*/bin/{name}")
    if not candidates:
        raise RuntimeError(
            f"PostgreSQL's {name} is not installed: apt-get install postgresql (Debian's 15)"
        )
    return max(candidates, key=lambda p: int(p.split("/")[4]))


def as_database_user(command: list[str]) -> list[str]:
    """The command as the `postgres` user when running as root (PostgreSQL refuses root)."""
    if os.geteuid() != 0:
        return command
    return ["runuser", "-u", PG_SUPERUSER, "--", *command]


class PostgresServer:
    """One PostgreSQL cluster (initdb) in a temp folder, listening on 127.0.0.1:`port`."""

    def __init__(self, port: int, *, settings: dict[str, str] | None = None) -> None:
        self.port = port
        self.folder = Path(tempfile.mkdtemp(prefix="llmup-pg-"))
        self.data = self.folder / "data"
        self.log = self.folder / "postgres.log"
        self.settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(port),
            "unix_socket_directories": str(self.folder),
            "max_connections": "200",
            **(settings or {}),
        }
        if os.geteuid() == 0:
            shutil.chown(self.folder, PG_SUPERUSER, PG_SUPERUSER)
        pwfile = self.folder / "pw"
        pwfile.write_text(PG_PASSWORD + "\n")
        if os.geteuid() == 0:
            shutil.chown(pwfile, PG_SUPERUSER, PG_SUPERUSER)
        self._run(
            pg_binary("initdb"), "-D", str(self.data), "-U", PG_SUPERUSER, "--pwfile", str(pwfile),
            "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync",
        )  # fmt: skip

    def _run(self, *command: str) -> subprocess.CompletedProcess:
        done = subprocess.run(
            as_database_user(list(command)), capture_output=True, text=True, timeout=120
        )
        if done.returncode != 0:
            raise RuntimeError(f"{command[0]} failed: {done.stderr.strip() or done.stdout}")
        return done

    def start(self) -> PostgresServer:
        options = " ".join(f"-c {k}={v}" for k, v in self.settings.items())
        self._run(
            pg_binary("pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", options,
            "-w", "-t", "60", "start",
        )  # fmt: skip
        return self

    def stop(self, mode: str = "fast") -> None:
        """pg_ctl stop (`fast`: connections are cut, as when a database server goes down)."""
        self._run(pg_binary("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def remove(self) -> None:
        with contextlib.suppress(RuntimeError):  # already stopped
            self.stop("immediate")
        shutil.rmtree(self.folder, ignore_errors=True)

    def url(self, database: str = "postgres", *, password: bool = True) -> str:
        secret = f":{PG_PASSWORD}" if password else ""
        return f"postgresql://{PG_SUPERUSER}{secret}@127.0.0.1:{self.port}/{database}"

    def psql(self, sql: str, database: str = "postgres") -> str:
        done = self._run(
            shutil.which("psql") or pg_binary("psql"), "-h", str(self.folder), "-p",
            str(self.port), "-U", PG_SUPERUSER, "-d", database, "-At", "-v", "ON_ERROR_STOP=1",
            "-c", sql,
        )  # fmt: skip
        return done.stdout.strip()

    def create_database(self, name: str) -> str:
        """A new empty database; its URL (with the password)."""
        self.psql(f'CREATE DATABASE "{name}"')
        return self.url(name)


class HAProxy:
    """HAProxy on docker/haproxy.cfg (the shipped file), its addresses from the environment."""

    def __init__(self, *, bind: int, stats: int, replicas: dict[str, str], log: Path) -> None:
        self.url = f"http://127.0.0.1:{bind}"
        self.stats_url = f"http://127.0.0.1:{stats}/stats;csv"
        self.env = {
            **os.environ,
            "LLMUP_HAPROXY_BIND": f"127.0.0.1:{bind}",
            "LLMUP_HAPROXY_STATS": f"127.0.0.1:{stats}",
            "LLMUP_CHECK_INTER": "500ms",
            **{f"LLMUP_{name.upper()}": address for name, address in replicas.items()},
        }
        self.log_path = log
        self.proc: subprocess.Popen | None = None

    def start(self) -> HAProxy:
        haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
        if not Path(haproxy).exists():
            raise RuntimeError("HAProxy is not installed: apt-get install haproxy (Debian's 2.6)")
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                [haproxy, "-db", "-f", str(HAPROXY_CFG)], stdout=out, stderr=subprocess.STDOUT,
                env=self.env, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log_path.read_text()
            try:
                httpx.get(self.stats_url, timeout=1)
                return self
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("HAProxy did not start:\n" + self.log_path.read_text())

    def servers(self, backend: str = "llmup_sessions") -> dict[str, str]:
        """Each server's status in `backend` ("UP", "DOWN", ...), from HAProxy's stats."""
        lines = httpx.get(self.stats_url, timeout=5).text.splitlines()
        columns = lines[0].lstrip("# ").split(",")
        rows = [dict(zip(columns, line.split(","))) for line in lines[1:] if line]
        return {
            r["svname"]: r["status"]
            for r in rows
            if r["pxname"] == backend and r["svname"] not in ("FRONTEND", "BACKEND")
        }

    def wait_status(self, server: str, status: str, timeout: float = 60) -> float:
        """Wait until HAProxy's health checks see `server` as `status`; the time it took."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.servers().get(server, "").startswith(status):
                return time.monotonic() - started
            time.sleep(0.1)
        raise AssertionError(f"{server} not {status} in {timeout} s: {self.servers()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=20)
