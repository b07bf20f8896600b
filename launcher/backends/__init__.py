"""Stage 4: what the parent does with a backend process. `launch/` builds the BackendSpec
of a plan (`launcher.backends.launch.backend_spec`), `supervise/` runs it
(`Supervisor(spec).start()`). The processes themselves are `launcher.workers`.

Both names are resolved on first use: the supervisor imports httpx, which a caller that only
builds a spec should not pay for.
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
