"""The whole pipeline: plan -> pull -> start the backend (supervised) -> the proxy.

`serve()` is what `llmup serve` calls once it has a plan. It prints nothing itself: the CLI
hands in `notify` (one line per event) and `progress` (a loading line) and renders them.

Process life, as an operator running it under systemd or docker needs it:

- the listening socket is bound first (`prepare_listener`), so a bad address, a busy port, a
  public bind without a key or a blank key is one line before anything is downloaded or loaded;
- while the weights are pulled and loaded the port already answers: /health 503 "loading",
  every other route an OpenAI-shaped 503 with Retry-After (`launcher.loading`);
- SIGTERM or SIGINT stops it within seconds in every state: while loading, the load is
  abandoned and the child killed; while serving, the backend is stopped first (SIGTERM, then
  SIGKILL after `serve.stop_grace_s`), so requests in flight end with an error at once, and
  the session store is closed cleanly;
- when the supervisor gives up on the backend (too many crashes within its window), serve
  raises the supervisor's BackendCrashError: the CLI prints one line and exits non-zero, and
  `Restart=on-failure` or `restart: unless-stopped` can act.
"""

from __future__ import annotations

import importlib
import logging
import signal
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import uvicorn

from launcher.backends.launch import backend_spec
from launcher.backends.spec import BackendSpec
from launcher.backends.supervise.headstart import HeadStart
from launcher.backends.supervise.process import Runtime
from launcher.backends.supervise.supervisor import Progress, State, Supervisor
from launcher.calibration.after_growth import record, record_when_grown
from launcher.calibration.oom_fallback import choose_fallback, is_cached, last_attempt
from launcher.calibration.records import lookup
from launcher.calibration.speedcheck import check_speed_when_idle
from launcher.catalog.gguf_file import shard_paths
from launcher.errors import BackendLoadError, ModelFileError, UsageError
from launcher.listen import StoppingServer, deadline_protocol, open_listener
from launcher.loading import answering_while_loading, replica_headers
from launcher.netaddr import http_url
from launcher.planning.plan import Plan
from launcher.private import private_home
from launcher.proxy import check_bind, create_app, open_store, warm_up
from launcher.proxy.auth import configured_keys
from launcher.served import WorkerKind
from launcher.settings import ServeSettings, Settings

log = logging.getLogger(__name__)

Notify = Callable[[str], None]
PROXY_APP = "launcher.proxy.app"
MAX_OOM_FALLBACKS = 2


@dataclass(frozen=True)
class SupervisedModel:
    """The supervised backend as the proxy sees it (a `ServedModel`): where it listens and how
    it is doing from the supervisor, what it serves from the plan (`for_plan`), or as given
    where there is no plan (a test's supervised llama_cpp.server)."""

    supervisor: Supervisor
    model_id: str
    context: int
    kind: WorkerKind
    embeddings: bool = False
    plan: Plan | None = None
    # set once the load's buffers are recorded against the plan (or that was given up): a
    # first start's worker may grow its KV cache after it serves, and is measured after that
    load_recorded: threading.Event | None = None

    @classmethod
    def for_plan(cls, supervisor: Supervisor, plan: Plan) -> SupervisedModel:
        return cls(supervisor, plan.model.id, plan.context, plan.worker_kind, plan=plan)

    @property
    def base_url(self) -> str:
        return self.supervisor.base_url

    @property
    def auth_headers(self) -> dict[str, str]:
        return self.supervisor.auth_headers

    @property
    def state(self) -> str:
        return self.supervisor.state.value

    @property
    def restarts(self) -> int:
        return self.supervisor.restarts

    @property
    def supervision(self) -> dict[str, Any]:
        return self.supervisor.supervision

    @property
    def ordered_stops(self) -> int:
        return self.supervisor.ordered_stops

    @property
    def plan_json(self) -> dict[str, Any] | None:
        if self.plan is None:
            return None
        return self.plan.model_dump(mode="json", exclude={"fallbacks"})

    @property
    def plan_summary(self) -> dict[str, Any] | None:
        return None if self.plan is None else plan_summary(self.plan)


def plan_summary(p: Plan) -> dict[str, Any]:
    """What /health shows of the plan (while loading too)."""
    return {
        "model": p.model.id,
        "backend": p.backend,
        "quant": p.quant,
        "context": p.context,
        "parallel": p.parallel,
        "offload": p.placement.offload,
        "memory_mib": p.memory_mib.model_dump(),
        "speed_warning": p.speed_warning.model_dump() if p.speed_warning else None,
    }


def supervisor_options(s: ServeSettings) -> dict[str, Any]:
    """The Supervisor's keyword arguments from the serve settings."""
    return {
        "max_restarts": s.max_restarts,
        "restart_window_s": s.restart_window_s,
        "health_interval_s": s.health_interval_s,
        "health_timeout_s": s.health_timeout_s,
        "health_failures": s.health_failures,
        "stop_timeout_s": s.stop_grace_s,
    }


def start_backend(
    plan: Plan,
    settings: Settings,
    *,
    offline: bool = False,
    verify: bool = True,
    quiet: bool = False,
    notify: Notify = log.info,
    progress: Callable[[Progress], None] | None = None,
    headstart: HeadStart | None = None,
    while_loading: Callable[[SupervisedModel], None] | None = None,
    stop: threading.Event | None = None,
) -> SupervisedModel:
    """Pull, start and wait for the backend (its speed is checked once the proxy serves:
    `serve`).

    Out of memory at load falls back (at most MAX_OOM_FALLBACKS times, each said in a notice
    with its arithmetic) to the best of the plan's fallbacks whose need is below the
    shortfall the load log measured (see launcher.calibration.oom_fallback). `headstart`:
    the backend `llmup` spawned from the last launch of the same command, taken when it is
    the plan's launch (see `headstart`); the plan's launch is recorded for the next start.
    `while_loading(served)` runs while each attempt's backend loads (see Supervisor.start);
    `stop` ends the threads that record the load after the start (see `_record_load`).
    """
    candidate, tried = plan, []
    while True:
        try:
            served = _start_one(
                candidate, settings, offline=offline, verify=verify, quiet=quiet,
                progress=progress, headstart=None if tried else headstart,
                while_loading=while_loading, stop=stop or threading.Event(),
            )  # fmt: skip
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
        return served


def weights_path(plan: Plan, *, offline: bool, verify: bool, quiet: bool) -> Path:
    """Where the plan's weights are: a local file as it is, else pulled and verified. The
    hub client is imported only for a pull (~0.2 s that serving a local file does without)."""
    if plan.source.local_path:
        path = Path(plan.source.local_path).expanduser()
        if not path.exists():
            raise ModelFileError(f"model file {path} does not exist")
        return path
    from launcher.weights.pull import pull

    return Path(pull(plan.source, offline=offline, verify=verify, progress=not quiet).path)


def _start_one(
    plan: Plan,
    settings: Settings,
    *,
    offline: bool,
    verify: bool,
    quiet: bool,
    progress,
    headstart: HeadStart | None = None,
    while_loading: Callable[[SupervisedModel], None] | None = None,
    stop: threading.Event,
) -> SupervisedModel:
    model_path = weights_path(plan, offline=offline, verify=verify, quiet=quiet)
    spec = plan_launch(plan, settings, model_path)
    adopted = headstart.take(spec) if headstart is not None else None
    supervisor = Supervisor(
        adopted.spec if adopted else spec,
        progress=progress,
        runtime=backend_runtime(settings, plan, model_path),
        adopted=(adopted.child, adopted.log_offset) if adopted else None,
        **supervisor_options(settings.serve),
    )
    served = SupervisedModel.for_plan(supervisor, plan)
    supervisor.start(while_loading=(lambda: while_loading(served)) if while_loading else None)
    if plan.backend == "llama.cpp" and not load_measured(plan, settings.home):
        served = replace(served, load_recorded=_record_load(plan, spec, supervisor, settings, stop))
    if headstart is not None and settings.runtime == "local":
        headstart.remember(spec, model_path, settings.home)  # what the next start spawns first
    return served


def plan_launch(plan: Plan, settings: Settings, model_path: Path) -> BackendSpec:
    """The plan's backend launch (`backend_spec`) with the settings' home and session TTL;
    a slot worker starts on one sequence and grows its KV cache behind the first requests."""
    return backend_spec(
        plan,
        model_path,
        home=settings.home,
        session_ttl_s=settings.proxy.session_ttl,
        quick_start=True,
    )


def _record_load(
    plan: Plan, spec: BackendSpec, supervisor: Supervisor, settings: Settings, stop
) -> threading.Event:
    """The load's buffers against the plan, for `llmup plan` to show next time: now, or once
    a worker that started small grew to the planned KV cache (`after_growth`). The event is
    set when that is settled."""
    if "--initial-parallel" in spec.command:
        return record_when_grown(plan, supervisor.attempt_log, settings.home, stop)
    record(plan, supervisor.attempt_log(), settings.home)
    done = threading.Event()
    done.set()
    return done


def docker_runtime() -> ModuleType:
    """The docker runtime (launcher.backends.supervise.container), imported for --runtime
    docker only: it brings the docker SDK, ~0.15 s of imports that a local backend's start
    does without."""
    from launcher.backends.supervise import container

    return container


def backend_runtime(settings: Settings, plan: Plan, model_path: Path) -> Runtime | None:
    """Where the backend runs: None for a local process, or a container (--runtime docker)
    of the plan's image with the model's files mounted read-only."""
    if settings.runtime != "docker":
        return None
    container = docker_runtime()
    client = container.check_engine(plan, settings.docker)
    weights = shard_paths(model_path) if model_path.is_file() else [model_path]
    image = container.image_for(plan, settings.docker)
    return container.DockerRuntime(client, image=image, weights=weights)


def load_measured(plan: Plan, home: Path) -> bool:
    """Whether an earlier start of this llama.cpp plan recorded its load (buffers as
    llama.cpp logged them): a later start need not record it again."""
    if plan.backend != "llama.cpp":
        return False
    record = lookup(home, plan)
    return (
        record is not None
        and bool(record.measured)
        and record.n_gpu_layers == plan.placement.n_gpu_layers
        and record.predicted == plan.memory_mib.model_dump()
    )


def check_keys(keys: list[str]) -> None:
    """Refuse a key no client could send: empty, blank, or padded with whitespace (HTTP
    strips it from header values)."""
    for key in keys:
        if not key.strip():
            raise UsageError(
                "an API key is empty or only whitespace (from --api-key, LLMUP_API_KEY or "
                "LLMUP_API_KEYS): no client can send it; give a real key"
            )
        if key != key.strip():
            raise UsageError(
                "an API key starts or ends with whitespace, which HTTP clients strip, so it "
                "could never match: remove the spaces"
            )


def prepare_listener(settings: Settings) -> socket.socket:
    """Everything about listening that can fail, checked before anything is loaded: blank
    keys, a public bind without a key, the address, the port. Returns the bound socket."""
    proxy = settings.proxy
    check_keys(proxy.api_keys)
    check_bind(proxy.host, configured_keys(proxy), proxy.insecure_no_auth)
    return open_listener(proxy.host, proxy.port)


def public_url(settings: Settings, listener: socket.socket) -> str:
    return http_url(settings.proxy.host, listener.getsockname()[1])


def _terminate_as_exit(signum, frame) -> None:
    raise SystemExit(128 + signum)


def preload_proxy() -> threading.Thread:
    """Import the proxy's FastAPI app in a thread while the backend process loads the model
    (on another core), so that create_app finds it imported instead of adding its import time
    (~0.4 s on 2 cores) to every start. A failure is left for create_app to raise."""

    def load() -> None:
        try:
            importlib.import_module(PROXY_APP)
        except Exception as exc:  # create_app imports it again and reports it
            log.debug("preloading %s failed: %s", PROXY_APP, exc)

    thread = threading.Thread(target=load, name="llmup-proxy-preload", daemon=True)
    thread.start()
    return thread


class ProxyApps:
    """The proxy's app for each backend attempt, built and warmed up while that attempt loads
    (~0.13 s and ~0.05 s on 2 cores that would otherwise follow the backend's readiness)."""

    def __init__(self, settings: Settings, sessions: Any) -> None:
        self.settings, self.sessions = settings, sessions
        self.built: list[tuple[SupervisedModel, Any]] = []

    def build(self, served: SupervisedModel) -> None:
        app = create_app(self.settings, served, self.sessions)
        warm_up(app)
        self.built.append((served, app))

    def of(self, served: SupervisedModel) -> Any:
        return next(app for built, app in self.built if built.supervisor is served.supervisor)


def serve(
    plan: Plan,
    settings: Settings,
    *,
    listener: socket.socket | None = None,
    headstart: HeadStart | None = None,
    offline: bool = False,
    verify: bool = True,
    quiet: bool = False,
    notify: Notify = log.info,
    progress: Callable[[Progress], None] | None = None,
    ready: Callable[[str, SupervisedModel], None] | None = None,
) -> None:
    """Serve `plan` until SIGINT/SIGTERM (or until the backend cannot be kept up, raised as
    BackendCrashError); the backend always stops and the session store always closes."""
    listener = listener or prepare_listener(settings)
    private_home(settings.home)  # conversations, saved KV caches and logs: the owner's only
    if settings.runtime == "docker":  # no engine or no image: say so before any download
        docker_runtime().check_engine(plan, settings.docker)
    # the proxy lets as many requests through as the backend decodes together
    settings = settings.with_proxy(max_inflight=max(settings.proxy.max_inflight, plan.parallel))
    previous = signal.signal(signal.SIGTERM, _terminate_as_exit)  # a clean stop while loading
    backend = sessions = None
    stopping = threading.Event()  # ends the speed check's thread with the serve
    preload_proxy()
    try:
        with answering_while_loading(listener, settings, plan_summary(plan)):
            sessions = open_store(settings)  # an unreachable database: said before any load
            apps = ProxyApps(settings, sessions)
            backend = start_backend(
                plan, settings, offline=offline, verify=verify, quiet=quiet, notify=notify,
                progress=progress, headstart=headstart, while_loading=apps.build,
                stop=stopping,
            )  # fmt: skip
            app = apps.of(backend)
        server = _server(settings, app, backend.supervisor)
        if ready:
            ready(public_url(settings, listener), backend)
        check_speed_when_idle(
            backend, settings.home, notify=notify, activity=app.state.proxy.admission.activity,
            stop=stopping, after=backend.load_recorded,
        )  # fmt: skip
        _run_until_stopped(server, listener, backend.supervisor)
    finally:
        stopping.set()
        listener.close()
        if backend is not None:
            backend.supervisor.stop(settings.serve.stop_grace_s)
        if sessions is not None:
            sessions.close()
        signal.signal(signal.SIGTERM, previous)


def _server(settings: Settings, app: Any, supervisor: Supervisor) -> StoppingServer:
    s = settings.serve
    config = uvicorn.Config(
        app,
        log_level="warning",
        http=deadline_protocol(
            s.header_timeout_s, s.body_timeout_s, headers=replica_headers(settings)
        ),
        timeout_graceful_shutdown=s.shutdown_timeout_s,  # type: ignore[arg-type]
    )
    return StoppingServer(config, on_shutdown=lambda: supervisor.stop(s.stop_grace_s))


def _run_until_stopped(server: StoppingServer, listener: socket.socket, sup: Supervisor) -> None:
    """Serve until a signal, or until the supervisor gives up (then raise its failure)."""

    def gave_up(_: Exception) -> None:
        server.should_exit = True

    sup.on_failure = gave_up
    if sup.state is State.FAILED:  # it gave up before the callback was in place
        server.should_exit = True
    server.run(sockets=[listener])
    if sup.state is State.FAILED and sup.failure is not None:
        raise sup.failure
