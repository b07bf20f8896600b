"""Stage 4: the backend process. Entry point: `Supervisor(spec).start()` on the BackendSpec
of a plan (`launcher.backends.launch.backend_spec`).

Both are resolved on first use: the supervisor imports httpx, which planning and the
workers that import `launcher.backends.*` modules should not pay for.
"""

from __future__ import annotations

from typing import Any

__all__ = ["BackendSpec", "Supervisor"]


def __getattr__(name: str) -> Any:
    if name == "Supervisor":
        from launcher.backends.supervisor import Supervisor

        return Supervisor
    if name == "BackendSpec":
        from launcher.backends.spec import BackendSpec

        return BackendSpec
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
