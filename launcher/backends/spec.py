"""A backend launch as a plain value: command, environment, port, devices, readiness.

The supervisor runs a BackendSpec as a local child process; a container runtime can run the
same value (its command in the image, `env` as the container's environment, `port` published
on 127.0.0.1, `devices` as the GPUs to expose). Nothing here touches the file system.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True, kw_only=True)
class BackendSpec:
    """Everything needed to start one backend and to know when it is ready.

    `env` is set on top of the inherited environment, after the names in `env_unset` are
    removed from it (compared case-insensitively: llama_cpp.server reads its settings from
    any environment variable named like a setting, e.g. HOST, PORT or API_KEY).
    """

    name: str
    command: list[str]
    port: int
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    env_unset: frozenset[str] = frozenset()
    host: str = "127.0.0.1"
    health_path: str = "/health"
    ready_timeout_s: float = 60.0
    model_alias: str | None = None
    devices: tuple[str, ...] = ()

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def health_url(self) -> str:
        return self.base_url + self.health_path

    def child_env(self, inherited: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment of a local child: inherited minus `env_unset`, plus `env`."""
        base = os.environ if inherited is None else inherited
        drop = {name.upper() for name in self.env_unset}
        return {k: v for k, v in base.items() if k.upper() not in drop} | self.env


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the kernel's pick); racy by nature, so the
    supervisor checks it again just before it starts the backend."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_is_free(host: str, port: int) -> bool:
    """Whether a server could bind host:port now, with SO_REUSEADDR as uvicorn binds it
    (so a port in TIME_WAIT after a crash counts as free, a listening one does not)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            raise
        return True
