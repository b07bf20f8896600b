"""The whole pipeline: plan -> pull -> start the backend (supervised) -> the proxy.

`serve()` is what `llmup serve` calls once it has a plan. It prints nothing itself: the CLI
hands in `notify` (one line per event) and `progress` (a loading line) and renders them.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.backends.oom_fallback import choose_fallback, is_cached, last_attempt
from launcher.backends.spec import BackendSpec, port_is_free
from launcher.backends.speedcheck import check_speed
from launcher.backends.supervisor import Progress, Supervisor
from launcher.errors import BackendLoadError, UsageError
from launcher.planning.plan import Plan
from launcher.settings import Settings

log = logging.getLogger(__name__)

Notify = Callable[[str], None]
MAX_OOM_FALLBACKS = 2


@dataclass
class ServedBackend:
    """The supervised backend plus what the proxy shows of the plan behind it."""

    supervisor: Supervisor
    plan: Plan

    @property
    def base_url(self) -> str:
        return self.supervisor.base_url

    @property
    def state(self) -> Any:
        return self.supervisor.state

    @property
    def restarts(self) -> int:
        return self.supervisor.restarts

    @property
    def model_id(self) -> str:
        return self.plan.model.id

    @property
    def context(self) -> int:
        return self.plan.context

    @property
    def plan_summary(self) -> dict[str, Any]:
        p = self.plan
        return {
            "model": p.model.id,
            "backend": p.backend,
            "quant": p.quant,
            "context": p.context,
            "offload": p.placement.offload,
            "memory_mib": p.memory_mib.model_dump(),
        }


def launch_spec(plan: Plan, model_path: Path, home: Path) -> BackendSpec:
    """The backend launch for a plan, as a value a process or a container can run."""
    if plan.backend == "exllamav2":
        from launcher.backends.exllamav2 import exllamav2_spec

        return exllamav2_spec(plan, model_path, home=home)
    from launcher.backends.llamacpp import llamacpp_spec

    return llamacpp_spec(plan, model_path, home=home)


def start_backend(
    plan: Plan,
    settings: Settings,
    *,
    offline: bool = False,
    quiet: bool = False,
    notify: Notify = log.info,
    progress: Callable[[Progress], None] | None = None,
) -> ServedBackend:
    """Pull, start and wait for the backend, then check its speed against the plan.

    Out of memory at load falls back (at most MAX_OOM_FALLBACKS times, each said in a notice
    with its arithmetic) to the best of the plan's fallbacks whose need is below the
    shortfall the load log measured (see launcher.backends.oom_fallback).
    """
    candidate, tried = plan, []
    while True:
        try:
            served = _start_one(
                candidate, settings, offline=offline, quiet=quiet, progress=progress
            )
        except BackendLoadError as exc:
            if exc.kind != "out_of_memory" or len(tried) >= MAX_OOM_FALLBACKS:
                raise
            tried.append(candidate)
            choice = choose_fallback(
                plan, candidate, last_attempt(exc.log_path or ""), tried=tried, cached=is_cached
            )
            if choice.plan is None:
                raise BackendLoadError(
                    f"{exc}\n  {choice.notice}", kind=exc.kind, log_path=exc.log_path
                ) from exc
            notify(choice.notice)
            candidate = choice.plan
            continue
        check_speed(served, settings.home, notify=notify)
        return served


def _start_one(
    plan: Plan, settings: Settings, *, offline: bool, quiet: bool, progress
) -> ServedBackend:
    from launcher.weights.pull import pull

    pulled = pull(plan.source, offline=offline, progress=not quiet)
    supervisor = Supervisor(launch_spec(plan, Path(pulled.path), settings.home), progress=progress)
    supervisor.start()
    if plan.backend == "llama.cpp":
        _record_calibration(plan, supervisor, settings.home)
    return ServedBackend(supervisor, plan)


def _record_calibration(plan: Plan, supervisor: Supervisor, home: Path) -> None:
    """Predicted vs measured buffers, kept for `llmup plan` to show next time."""
    from launcher.backends.calibration import record_load

    try:
        record = record_load(home, plan, supervisor.attempt_log())
    except OSError as exc:  # a calibration record is never worth failing a serve
        log.warning("could not record the load's buffer sizes: %s", exc)
        return
    if record is None:
        log.warning("the backend log held no buffer sizes to compare with the plan")


def check_listen(settings: Settings, host: str, port: int) -> None:
    """Refuse a public bind without a key, and a busy port, before anything is loaded."""
    from launcher.proxy import check_bind
    from launcher.proxy.auth import configured_keys

    check_bind(host, configured_keys(settings.proxy), settings.proxy.insecure_no_auth)
    if not port_is_free(host, port):
        raise UsageError(f"port {port} on {host} is already in use; pick another with --port")


def _terminate_as_exit(signum, frame) -> None:
    raise SystemExit(128 + signum)


def serve(
    plan: Plan,
    settings: Settings,
    *,
    offline: bool = False,
    quiet: bool = False,
    notify: Notify = log.info,
    progress: Callable[[Progress], None] | None = None,
    ready: Callable[[str, ServedBackend], None] | None = None,
) -> None:
    """Serve `plan` on settings.proxy.host:port until SIGINT/SIGTERM; the backend always stops."""
    import uvicorn

    from launcher.proxy import SessionStore, create_app

    host, port = settings.proxy.host, settings.proxy.port
    check_listen(settings, host, port)
    previous = signal.signal(signal.SIGTERM, _terminate_as_exit)  # a clean stop while loading
    backend = None
    sessions = None
    try:
        backend = start_backend(
            plan, settings, offline=offline, quiet=quiet, notify=notify, progress=progress
        )
        sessions = SessionStore.at_home(settings.home, ttl_s=settings.proxy.session_ttl)
        app = create_app(settings, backend, sessions)
        server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
        if ready:
            ready(f"http://{host}:{port}", backend)
        server.run()
    finally:
        if backend is not None:
            backend.supervisor.stop()
        if sessions is not None:
            sessions.close()
        signal.signal(signal.SIGTERM, previous)
