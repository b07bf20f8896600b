"""Thin commands: parse, call one core function, render (rich) or print --json.

Errors llmup anticipates (LlmupError) become one line on stderr and the exit code of
their class: 2 bad input, 3 nothing fits, 1 otherwise. Never a traceback.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from launcher import render
from launcher.errors import LlmupError, NothingFitsError, UsageError

if TYPE_CHECKING:
    from launcher.settings import Settings

app = typer.Typer(
    help="Serve the largest Llama-2 this machine can hold behind an OpenAI-compatible API.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]
AutoOpt = Annotated[
    bool, typer.Option("--auto", help="Detect this machine's hardware (the default).")
]
HardwareOpt = Annotated[
    Path | None,
    typer.Option(
        "--hardware",
        help="Plan for a snapshot from `llmup detect --json`, or `profile`: the --profile's own.",
    ),
]
ModelOpt = Annotated[
    str | None, typer.Option("--model", help="Pin a model id (llama-2-70b-chat) or size (70b).")
]
MaxModelOpt = Annotated[
    str | None,
    typer.Option("--max-model", help="Cap the model size (13b): the largest up to it that fits."),
]
ProfileOpt = Annotated[
    str | None,
    typer.Option(
        "--profile",
        help="A machine profile (see `llmup profiles`) or a .toml file: its settings apply "
        "under the environment and the flags.",
    ),
]
BackendOpt = Annotated[str | None, typer.Option("--backend", help="auto | llama.cpp | exllamav2")]
ContextOpt = Annotated[
    int | None, typer.Option("--context", help="Context length in tokens (default 4096).")
]
KvOpt = Annotated[str | None, typer.Option("--kv-cache", help="KV cache type: f16 | q8_0 | q4_0")]
ParallelOpt = Annotated[
    int | None,
    typer.Option(
        "--parallel",
        help="llama.cpp: sessions decoded together, each with its own KV cache of --context "
        "tokens (default: as many as fit, 1-8).",
    ),
]
ImplOpt = Annotated[
    str | None,
    typer.Option(
        "--llamacpp-impl",
        help="llama.cpp worker: slots (llmup's, keeps each session's KV cache; default) or "
        "server (llama-cpp-python's, one request at a time).",
    ),
]
ReserveOpt = Annotated[
    int | None, typer.Option("--reserve-mib", help="MiB kept free per GPU (default 1024).")
]
OffloadOpt = Annotated[
    bool,
    typer.Option("--allow-offload", help="Allow layers on the CPU when the GPUs are too small."),
]
NoVerifyOpt = Annotated[
    bool,
    typer.Option(
        "--no-verify", help="Accept files the hub gives no checksum for (refused otherwise)."
    ),
]
ModelFileOpt = Annotated[
    Path | None,
    typer.Option("--model-file", help="Plan a local GGUF file instead of the catalog."),
]
GpusOpt = Annotated[
    str | None,
    typer.Option(
        "--gpus",
        help="Use only these GPUs: indices or UUIDs as nvidia-smi lists them, e.g. 0,2 "
        "(default: CUDA_VISIBLE_DEVICES, else all).",
    ),
]
MinSpeedOpt = Annotated[
    float | None,
    typer.Option(
        "--min-tokens-per-s",
        help="Pick the largest model expected to decode at least this many tokens/s.",
    ),
]


PROFILE_HARDWARE = Path("profile")


def default_settings() -> Settings:
    """The settings tree without a profile, imported on first use: pydantic-settings is not
    worth its import time to `llmup --help`. A bad LLMUP_ variable is one line, exit 2."""
    from pydantic import ValidationError

    from launcher.settings import Settings

    try:
        return Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        name = "__".join(str(part) for part in first["loc"]).upper() or "settings"
        raise UsageError(f"LLMUP_{name}={first.get('input')!r}: {first['msg']}") from None


def command_settings(profile_name: str | None):
    """(settings, profile): defaults < the profile's pinned settings < the environment."""
    if profile_name is None:
        return default_settings(), None
    from launcher.profiles import find_profile
    from launcher.settings import load_settings

    profile = find_profile(profile_name, default_settings().home)
    return load_settings(profile.pinned), profile


def hardware_snapshot(hardware: Path | None, gpus: str | None = None, profile=None):
    """A snapshot file when given (never probed: it may be another machine), the profile's
    own for `--hardware profile`, else this machine's (what --auto asks for); narrowed to
    `--gpus`, with a warning when it is not the profile's machine."""
    from launcher.hardware.visible import select_gpus

    if hardware == PROFILE_HARDWARE:
        if profile is None:
            raise UsageError("--hardware profile plans a profile's own machine: add --profile NAME")
        return select_gpus(profile.hardware, gpus=gpus)
    if hardware is not None:
        from launcher.hardware.snapshot import load_snapshot

        snap = select_gpus(load_snapshot(hardware), gpus=gpus)
    else:
        from launcher.hardware.detect import detect

        snap = detect(home=default_settings().home, gpus=gpus)
    if profile is not None:
        warn_if_not_profile_machine(profile, snap)
    return snap


def warn_if_not_profile_machine(profile, snap) -> None:
    from launcher.profiles import differences, mismatch_warning

    found = differences(profile.hardware, snap)
    if found:
        render.warning(mismatch_warning(profile.name, found))


def plan_request(settings: Settings, *, hardware, profile=None, gpus=None, **flags):
    """Merge CLI flags over the settings tree (profile < env LLMUP_PLANNING__*) into a
    PlanRequest. A pinned model (flag, env or profile) lifts any size cap."""
    from launcher.planning.request import request_from_settings

    context = flags.get("context")
    if context is not None and context <= 0:
        raise UsageError(f"--context must be a positive number of tokens, got {context}")
    cfg = settings.planning
    snap = hardware_snapshot(hardware, gpus if gpus is not None else cfg.gpus, profile)
    if settings.runtime == "docker":  # the backend runs in llmup's image, not this Python
        from launcher.hardware.images import in_image

        snap = in_image(snap, settings.docker.cpu_image, settings.docker.cuda_image)
    return request_from_settings(cfg, snap, **flags)


@app.command()
def detect(gpus: GpusOpt = None, json_out: JsonOpt = False) -> None:
    """Show this machine's GPUs, unified memory, RAM, cores, CPU speed and installed backends."""
    snap = hardware_snapshot(None, gpus if gpus is not None else default_settings().planning.gpus)
    render.print_json(snap) if json_out else render.snapshot(snap)


@app.command()
def plan(
    auto: AutoOpt = False,
    hardware: HardwareOpt = None,
    profile: ProfileOpt = None,
    model: ModelOpt = None,
    max_model: MaxModelOpt = None,
    backend: BackendOpt = None,
    context: ContextOpt = None,
    kv_cache: KvOpt = None,
    reserve_mib: ReserveOpt = None,
    allow_offload: OffloadOpt = False,
    model_file: ModelFileOpt = None,
    gpus: GpusOpt = None,
    min_tokens_per_s: MinSpeedOpt = None,
    parallel: ParallelOpt = None,
    llamacpp_impl: ImplOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Pick the largest model and highest precision that fit, with memory and speed."""
    from launcher.planning.planner import make_plan

    settings, chosen_profile = command_settings(profile)
    req = plan_request(
        settings,
        profile=chosen_profile,
        hardware=hardware,
        model=model,
        max_model=max_model,
        backend=backend,
        context=context,
        kv_cache=kv_cache,
        reserve_mib=reserve_mib,
        allow_offload=allow_offload,
        model_file=model_file,
        gpus=gpus,
        min_tokens_per_s=min_tokens_per_s,
        parallel=parallel,
        llamacpp_impl=llamacpp_impl,
    )
    try:
        result = make_plan(req)
    except NothingFitsError as exc:
        if json_out:
            render.print_json({"error": str(exc), "closest": [r.model_dump() for r in exc.closest]})
        else:
            render.rejections(exc.closest, title="Nothing fits; the closest candidates")
        raise
    attach_measurement(result, settings.home)
    render.print_json(result) if json_out else render.plan(result)


def attach_measurement(plan, home: Path) -> None:
    """A model already run on this machine shows what its load measured (plan.measured)."""
    from launcher.backends.calibration import compare, lookup

    record = lookup(home, plan)
    if record is not None:
        plan.measured = {
            "recorded_at": record.recorded_at,
            "figures": [f.model_dump() for f in compare(record)],
            "speed": record.speed,
        }


PlanFileOpt = Annotated[
    Path | None,
    typer.Option("--plan", help="Pull what a saved `llmup plan --json` chose (no planning)."),
]


def chosen_plan(plan_file: Path | None, settings: Settings, profile=None, **planning):
    """The saved plan when given, else a fresh one from the same options `llmup plan` takes."""
    from launcher.planning.plan import load_plan
    from launcher.planning.planner import make_plan

    if plan_file is not None:
        given = [f"--{k.replace('_', '-')}" for k, v in planning.items() if v not in (None, False)]
        if given:
            raise UsageError(
                f"--plan cannot be combined with {', '.join(given)}: "
                "the saved plan already fixes them"
            )
        return load_plan(plan_file)
    return make_plan(plan_request(settings, profile=profile, **planning))


@app.command()
def pull(
    auto: AutoOpt = False,
    hardware: HardwareOpt = None,
    profile: ProfileOpt = None,
    model: ModelOpt = None,
    max_model: MaxModelOpt = None,
    backend: BackendOpt = None,
    context: ContextOpt = None,
    kv_cache: KvOpt = None,
    reserve_mib: ReserveOpt = None,
    allow_offload: OffloadOpt = False,
    model_file: ModelFileOpt = None,
    gpus: GpusOpt = None,
    min_tokens_per_s: MinSpeedOpt = None,
    parallel: ParallelOpt = None,
    llamacpp_impl: ImplOpt = None,
    plan_file: PlanFileOpt = None,
    offline: Annotated[
        bool, typer.Option("--offline", help="Use only the local cache (like HF_HUB_OFFLINE=1).")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List files, sizes and what is cached; fetch nothing.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
    no_verify: NoVerifyOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Download the planned weights into the Hugging Face cache, verified; print where."""
    from launcher.weights.pull import pull as run_pull

    settings, chosen_profile = command_settings(profile)
    chosen = chosen_plan(
        plan_file,
        settings,
        chosen_profile,
        hardware=hardware,
        model=model,
        max_model=max_model,
        backend=backend,
        context=context,
        kv_cache=kv_cache,
        reserve_mib=reserve_mib,
        allow_offload=allow_offload,
        model_file=model_file,
        gpus=gpus,
        min_tokens_per_s=min_tokens_per_s,
        parallel=parallel,
        llamacpp_impl=llamacpp_impl,
    )
    if not json_out and not quiet:
        render.out.print(
            f"{chosen.model.id} {chosen.quant} ({chosen.backend}) from "
            f"{chosen.source.repo_id or chosen.source.local_path}",
            highlight=False,
        )
    result = run_pull(
        chosen.source, offline=offline, dry_run=dry_run, progress=not quiet, verify=not no_verify
    )
    render.print_json(result.to_dict()) if json_out else render.pull_result(result)


@app.command()
def serve(
    auto: AutoOpt = False,
    hardware: HardwareOpt = None,
    profile: ProfileOpt = None,
    model: ModelOpt = None,
    max_model: MaxModelOpt = None,
    backend: BackendOpt = None,
    context: ContextOpt = None,
    kv_cache: KvOpt = None,
    reserve_mib: ReserveOpt = None,
    allow_offload: OffloadOpt = False,
    model_file: ModelFileOpt = None,
    gpus: GpusOpt = None,
    min_tokens_per_s: MinSpeedOpt = None,
    parallel: ParallelOpt = None,
    llamacpp_impl: ImplOpt = None,
    plan_file: PlanFileOpt = None,
    runtime: Annotated[
        str | None,
        typer.Option(
            "--runtime", help="local (a child process, the default) or docker (a container)."
        ),
    ] = None,
    host: Annotated[str | None, typer.Option("--host", help="Address to listen on.")] = None,
    port: Annotated[int | None, typer.Option("--port", help="Port (default 8000).")] = None,
    api_key: Annotated[
        list[str] | None,
        typer.Option(
            "--api-key",
            help="An accepted API key (repeatable). Visible to every local user in `ps`: "
            "prefer LLMUP_API_KEY or --api-key-file.",
        ),
    ] = None,
    api_key_file: Annotated[
        Path | None,
        typer.Option(
            "--api-key-file",
            help="A file of accepted API keys, one per line (or LLMUP_API_KEYS_FILE); "
            "unreadable or empty stops serve.",
        ),
    ] = None,
    allowed_host: Annotated[
        list[str] | None,
        typer.Option(
            "--allowed-host",
            help="Without keys, a host name requests may address besides loopback and IP "
            "addresses (repeatable; `*` for any). Guards against DNS rebinding.",
        ),
    ] = None,
    cors_origin: Annotated[
        list[str] | None,
        typer.Option(
            "--cors-origin",
            help="A web origin (https://app.example.com) whose pages may call the API from a "
            "browser (repeatable; or LLMUP_PROXY__CORS_ORIGINS). Off by default.",
        ),
    ] = None,
    insecure_no_auth: Annotated[
        bool, typer.Option("--insecure-no-auth", help="Allow a public bind without a key.")
    ] = False,
    offline: Annotated[bool, typer.Option("--offline", help="Use only cached weights.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No download bars.")] = False,
    no_verify: NoVerifyOpt = False,
) -> None:
    """Detect, plan, pull, start the backend and serve the OpenAI-compatible API."""
    from launcher.proxy.auth import configured_keys
    from launcher.serve import prepare_listener
    from launcher.serve import serve as run_serve

    settings, chosen_profile = command_settings(profile)
    serve_settings(settings, host, port, api_key, insecure_no_auth, runtime)
    access_settings(
        settings, api_key_file=api_key_file, allowed_hosts=allowed_host, cors_origins=cors_origin
    )
    listener = prepare_listener(settings)  # address, port and keys: one line, before anything
    chosen = chosen_plan(
        plan_file,
        settings,
        chosen_profile,
        hardware=hardware,
        model=model,
        max_model=max_model,
        backend=backend,
        context=context,
        kv_cache=kv_cache,
        reserve_mib=reserve_mib,
        allow_offload=allow_offload,
        model_file=model_file,
        gpus=gpus,
        min_tokens_per_s=min_tokens_per_s,
        parallel=parallel,
        llamacpp_impl=llamacpp_impl,
    )
    render.plan(chosen, rejected=3)
    keyed = bool(configured_keys(settings.proxy))
    run_serve(
        chosen,
        settings,
        listener=listener,
        offline=offline,
        verify=not no_verify,
        quiet=quiet,
        notify=render.note,
        progress=render.LoadingLine(),
        ready=lambda url, b: render.serving(
            url,
            b.model_id,
            keyed=keyed,
            keys_file=settings.proxy.api_keys_file,
            slow=b.plan.speed_warning.message if b.plan.speed_warning else None,
        ),
    )


RUNTIMES = ("local", "docker")


def serve_settings(settings: Settings, host, port, api_keys, insecure_no_auth, runtime) -> None:
    """Lay serve's flags over the settings tree (flags win over environment and profile)."""
    if runtime is not None:
        if runtime not in RUNTIMES:
            raise UsageError(f"--runtime must be local or docker, got {runtime!r}")
        settings.runtime = runtime
    proxy = settings.proxy
    if host is not None:
        proxy.host = host
    if port is not None:
        if not 0 < port < 65536:
            raise UsageError(f"--port must be between 1 and 65535, got {port}")
        proxy.port = port
    proxy.api_keys = list(dict.fromkeys([*proxy.api_keys, *(api_keys or [])]))
    proxy.insecure_no_auth = proxy.insecure_no_auth or insecure_no_auth


def access_settings(
    settings: Settings,
    *,
    api_key_file: Path | None,
    allowed_hosts: list[str] | None,
    cors_origins: list[str] | None = None,
) -> None:
    """Lay the keys-file, allowed-host and CORS flags over the settings (flags win)."""
    from launcher.settings import split_hosts, split_origins

    proxy = settings.proxy
    if api_key_file is not None:
        proxy.api_keys_file = api_key_file
    extra = split_hosts(allowed_hosts or [])
    proxy.allowed_hosts = list(dict.fromkeys([*proxy.allowed_hosts, *extra]))
    try:
        origins = split_origins(cors_origins or [])
    except ValueError as exc:
        raise UsageError(f"--cors-origin: {exc}") from None
    proxy.cors_origins = list(dict.fromkeys([*proxy.cors_origins, *origins]))


@app.command()
def profiles(json_out: JsonOpt = False) -> None:
    """List the machine profiles with the plan each gets on its own hardware."""
    from launcher.profiles.listing import profile_plans

    rows = profile_plans(default_settings().home)
    if json_out:
        render.print_json({"profiles": [row.to_dict() for row in rows]})
    else:
        render.profiles(rows)


@app.command()
def estimate(
    params: Annotated[
        str | None, typer.Option("--params", help="A parameter count: 7e9, 1.5B, 270M.")
    ] = None,
    context: Annotated[
        int, typer.Option("--context", help="Context for the KV cache column.")
    ] = 4096,
    exact: Annotated[
        bool, typer.Option("--exact", help="Use the catalog's real parameter counts.")
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """The rule of thumb (bytes per parameter), made exact, with KV cache and training state."""
    from launcher.planning.estimate import (
        EstimateInput,
        estimate_table,
        parse_params,
    )
    from launcher.planning.estimate import (
        estimate as run_estimate,
    )

    models = [EstimateInput.from_params(parse_params(params))] if params else None
    report = run_estimate(models, context=context, exact=exact)
    render.print_json(report) if json_out else render.out.print(estimate_table(report))


pins_app = typer.Typer(
    help="The commit each hub source is pinned to: what `pull` downloads, whatever the branch "
    "does meanwhile.",
    no_args_is_help=True,
)
app.add_typer(pins_app, name="pins")


@pins_app.command("show")
def pins_show(json_out: JsonOpt = False) -> None:
    """Every catalog source (and any other pulled one) with its pinned commit."""
    from launcher.catalog.pins import Pins
    from launcher.weights.cache import llmup_home

    pins = Pins.load(llmup_home())
    rows = [(repo, rev, pins.commit(repo, rev)) for repo, rev in pin_sources(pins)]
    if json_out:
        keys = ("repo_id", "revision", "commit")
        render.print_json({"pins": [dict(zip(keys, row)) for row in rows]})
    else:
        render.pins(rows)


@pins_app.command("refresh")
def pins_refresh(
    repo: Annotated[
        list[str] | None, typer.Argument(help="Only these repositories (default: all).")
    ] = None,
    catalog: Annotated[
        bool, typer.Option("--catalog", help="Write the package's shipped pins (maintainers).")
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Ask the hub where each source's branch points now and pin it there."""
    from launcher.catalog.pins import SHIPPED, Pins, refresh
    from launcher.weights.cache import llmup_home
    from launcher.weights.remote import commit_of

    pins = Pins.load(llmup_home())
    sources = [s for s in pin_sources(pins) if not repo or s[0] in repo]
    unknown = sorted(set(repo or ()) - {s[0] for s in sources})
    if unknown:
        raise UsageError(f"{', '.join(unknown)}: not a source of the catalog or of a past pull")
    changes = refresh(pins, sources, commit_of, into=SHIPPED if catalog else None)
    if json_out:
        render.print_json({"changes": [asdict(c) for c in changes]})
    else:
        render.pin_changes(changes)
    failed = [c for c in changes if c.error]
    if failed:
        raise LlmupError(
            f"{len(failed)} of {len(changes)} sources kept their old pin: "
            f"{failed[0].repo_id}@{failed[0].revision}: {failed[0].error}"
        )


def pin_sources(pins) -> list[tuple[str, str]]:
    """The catalog's sources, then any other source a pull pinned."""
    from launcher.catalog.loader import load_catalog
    from launcher.catalog.pins import catalog_sources

    pulled = [(repo, rev) for repo, revs in sorted(pins.local.items()) for rev in sorted(revs)]
    return list(dict.fromkeys(catalog_sources(load_catalog()) + pulled))


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except LlmupError as exc:
        render.error(str(exc))
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        render.error("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
