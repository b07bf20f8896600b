"""Stage 4: the backend process. Entry point: `Supervisor(spec).start()` on the BackendSpec
of a plan (`launcher.backends.launch.backend_spec`).

Both are resolved on first use: the supervisor imports httpx, which planning and the
workers that import `launcher.backends.*` modules should not pay for.
"""

from launcher.lazy import lazy_names

__all__ = ["BackendSpec", "Supervisor"]
__getattr__ = lazy_names(
    __name__,
    {
        "Supervisor": "launcher.backends.supervise.supervisor",
        "BackendSpec": "launcher.backends.spec",
    },
)
