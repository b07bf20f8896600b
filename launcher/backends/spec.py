"""A backend launch as a plain value: command, environment, port, devices, readiness, key.

The supervisor runs a BackendSpec as a local child process; a container runtime can run the
same value (its command in the image, `launch_env()` as the container's environment, `port`
published on 127.0.0.1, `devices` as the GPUs to expose). Nothing here touches the file
system.

Every backend llmup starts gets a random per-run key (`api_key`): the child reads it from the
environment variable `KEY_ENV` (never from its command line, which any local user can read
in /proc) and refuses every request without `Authorization: Bearer <key>`; only the proxy
and the supervisor's health checks send it (`auth_headers`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from launcher.netaddr import LOOPBACK, http_url
from launcher.runkey import KEY_ENV


@dataclass(frozen=True, kw_only=True)
class WorkerLaunch:
    """What one backend kind adds to the common launch: its module, flags and timeouts.

    `args` are the worker's flags except --host and --port, which every worker takes alike.
    """

    name: str
    module: str
    args: list[str]
    ready_timeout_s: float
    log_stem: str
    env_unset: frozenset[str] = frozenset()
    state_dirs: tuple[Path, ...] = ()  # folders the worker writes and keeps across runs


@dataclass(frozen=True, kw_only=True)
class BackendSpec:
    """Everything needed to start one backend and to know when it is ready.

    `env` is set on top of the inherited environment, after the names in `env_unset` are
    removed from it (compared case-insensitively: llama_cpp.server reads its settings from
    any environment variable named like a setting, e.g. HOST, PORT or API_KEY). `api_key`,
    when set, reaches the child as `KEY_ENV` and never shows in a repr or a log line.
    """

    name: str
    command: list[str]
    port: int
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    env_unset: frozenset[str] = frozenset()
    host: str = LOOPBACK
    health_path: str = "/health"
    ready_timeout_s: float = 60.0
    model_alias: str | None = None
    devices: tuple[str, ...] = ()
    api_key: str | None = field(default=None, repr=False)
    # folders the backend writes and keeps across runs (the slot worker's saved sessions): a
    # container runtime mounts them read-write at the same path
    state_dirs: tuple[Path, ...] = ()

    @property
    def base_url(self) -> str:
        return http_url(self.host, self.port)

    @property
    def health_url(self) -> str:
        return self.base_url + self.health_path

    @property
    def auth_headers(self) -> dict[str, str]:
        """What a caller of this backend sends with every request (empty without a key)."""
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def with_run(self, *, port: int, api_key: str | None) -> BackendSpec:
        """The same launch on another port with another key: every worker takes its port as
        `--port N` (the rest of the command is the launch itself)."""
        command = list(self.command)
        at = command.index("--port") + 1
        command[at] = str(port)
        return replace(self, command=command, port=port, api_key=api_key)

    def launch_env(self) -> dict[str, str]:
        """The variables the launch sets: `env`, plus the per-run key under KEY_ENV."""
        return self.env | ({KEY_ENV: self.api_key} if self.api_key else {})

    def child_env(self, inherited: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment of a local child: inherited minus `env_unset` and any stale
        KEY_ENV, plus `launch_env()`."""
        base = os.environ if inherited is None else inherited
        drop = {name.upper() for name in self.env_unset} | {KEY_ENV}
        return {k: v for k, v in base.items() if k.upper() not in drop} | self.launch_env()
