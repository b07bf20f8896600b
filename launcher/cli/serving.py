"""`llmup serve`: the plan flags and the serving flags laid over the settings tree (as
copies: the tree the command started from is never assigned into), then the pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from launcher import render
from launcher.cli.commands import chosen_plan, command_settings
from launcher.cli.options import NoVerifyOpt, PlanFileOpt, PlanFlags, with_plan_flags
from launcher.errors import UsageError

if TYPE_CHECKING:
    from launcher.backends.supervise.headstart import HeadStart
    from launcher.settings import Settings


@with_plan_flags
def serve(
    flags: PlanFlags,
    ctx: typer.Context,
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
    max_tokens: Annotated[
        int | None,
        typer.Option(
            "--max-tokens",
            help="A reply's token limit when a request sets none, and the most one may ask "
            "for (llama-server's -n; or LLMUP_PROXY__MAX_TOKENS). Default: the rest of the "
            "context.",
        ),
    ] = None,
    model_alias: Annotated[
        list[str] | None,
        typer.Option(
            "--model-alias",
            help="Another name the served model answers to, e.g. an app's fixed default "
            "(repeatable; `*` for any name). Unknown names are a 404 otherwise.",
        ),
    ] = None,
    sessions_db: Annotated[
        str | None,
        typer.Option(
            "--sessions-db",
            help="Where sessions live: postgresql://USER@HOST/DB (shared by replicas) or an "
            "SQLite file (default: sessions.sqlite3 under the llmup home).",
        ),
    ] = None,
    replica_name: Annotated[
        str | None,
        typer.Option(
            "--replica-name",
            help="This replica's name in X-Llmup-Replica (default: the host name).",
        ),
    ] = None,
    offline: Annotated[bool, typer.Option("--offline", help="Use only cached weights.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No download bars.")] = False,
    no_verify: NoVerifyOpt = False,
) -> None:
    """Detect, plan, pull, start the backend and serve the OpenAI-compatible API."""
    head: HeadStart | None = ctx.obj  # the backend `llmup` spawned from its last launch
    from launcher.proxy.auth import configured_keys
    from launcher.serve import prepare_listener
    from launcher.serve import serve as run_serve

    settings, chosen_profile = command_settings(flags.profile)
    settings = serve_settings(settings, host, port, api_key, insecure_no_auth, runtime)
    settings = store_settings(settings, sessions_db=sessions_db, replica_name=replica_name)
    settings = access_settings(
        settings,
        api_key_file=api_key_file,
        allowed_hosts=allowed_host,
        aliases=model_alias,
        cors_origins=cors_origin,
    )
    settings = reply_limit(settings, max_tokens)
    listener = prepare_listener(settings)  # address, port and keys: one line, before anything
    chosen = chosen_plan(
        plan_file,
        settings,
        chosen_profile,
        held_pid=head.pid if head is not None else None,
        **flags.planning(),
    )
    render.plan(chosen, rejected=3)
    keyed = bool(configured_keys(settings.proxy))
    run_serve(
        chosen,
        settings,
        listener=listener,
        headstart=head,
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
            aliases=settings.proxy.model_aliases,
        ),
    )


RUNTIMES = ("local", "docker")


def serve_settings(settings: Settings, host, port, api_keys, insecure_no_auth, runtime) -> Settings:
    """Serve's flags laid over the settings tree (flags win over environment and profile)."""
    if runtime is not None:
        if runtime not in RUNTIMES:
            raise UsageError(f"--runtime must be local or docker, got {runtime!r}")
        settings = settings.model_copy(update={"runtime": runtime})
    proxy = settings.proxy
    changes: dict[str, Any] = {
        "api_keys": list(dict.fromkeys([*proxy.api_keys, *(api_keys or [])])),
        "insecure_no_auth": proxy.insecure_no_auth or insecure_no_auth,
    }
    if host is not None:
        changes["host"] = host
    if port is not None:
        if not 0 < port < 65536:
            raise UsageError(f"--port must be between 1 and 65535, got {port}")
        changes["port"] = port
    return settings.with_proxy(**changes)


def store_settings(
    settings: Settings, *, sessions_db: str | None, replica_name: str | None
) -> Settings:
    """--sessions-db and --replica-name laid over the settings, checked as the settings are."""
    from launcher.settings import check_replica_name, check_sessions_db

    changes: dict[str, Any] = {}
    try:
        if sessions_db is not None:
            changes["sessions_db"] = check_sessions_db(sessions_db)
        if replica_name is not None:
            changes["replica_name"] = check_replica_name(replica_name)
    except ValueError as exc:
        flag = "--replica-name" if replica_name and "replica" in str(exc) else "--sessions-db"
        raise UsageError(f"{flag}: {exc}") from None
    return settings.with_proxy(**changes)


def reply_limit(settings: Settings, max_tokens: int | None) -> Settings:
    """--max-tokens over the settings."""
    if max_tokens is None:
        return settings
    if max_tokens < 1:
        raise UsageError(f"--max-tokens must be a positive number of tokens, got {max_tokens}")
    return settings.with_proxy(max_tokens=max_tokens)


def access_settings(
    settings: Settings,
    *,
    api_key_file: Path | None,
    allowed_hosts: list[str] | None,
    aliases: list[str] | None = None,
    cors_origins: list[str] | None = None,
) -> Settings:
    """The keys-file, allowed-host, model-alias and CORS flags laid over the settings (flags
    win; names and origins add to the environment's)."""
    from launcher.settings import split_hosts, split_names, split_origins

    proxy = settings.proxy
    extra = split_hosts(allowed_hosts or [])
    try:
        origins = split_origins(cors_origins or [])
    except ValueError as exc:
        raise UsageError(f"--cors-origin: {exc}") from None
    changes: dict[str, Any] = {
        "allowed_hosts": list(dict.fromkeys([*proxy.allowed_hosts, *extra])),
        "model_aliases": split_names([*proxy.model_aliases, *(aliases or [])]),
        "cors_origins": list(dict.fromkeys([*proxy.cors_origins, *origins])),
    }
    if api_key_file is not None:
        changes["api_keys_file"] = api_key_file
    return settings.with_proxy(**changes)
