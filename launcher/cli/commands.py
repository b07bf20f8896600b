"""The pipeline's commands: detect, plan, pull, profiles, estimate; and what `serve` shares
with them (the settings tree, the hardware snapshot, the plan from the plan flags).

Thin: parse, call one core function, render (rich) or print --json.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from launcher import render
from launcher.cli.options import (
    GpusOpt,
    JsonOpt,
    NoVerifyOpt,
    PlanFileOpt,
    PlanFlags,
    with_plan_flags,
)
from launcher.errors import NothingFitsError, UsageError

if TYPE_CHECKING:
    from launcher.settings import Settings

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


def hardware_snapshot(
    hardware: Path | None, gpus: str | None = None, profile=None, held_pid: int | None = None
):
    """A snapshot file when given (never probed: it may be another machine), the profile's
    own for `--hardware profile`, else this machine's (what --auto asks for); narrowed to
    `--gpus`, with a warning when it is not the profile's machine. `held_pid`: serve's
    head-started backend, whose RAM counts as available."""
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

        snap = detect(home=default_settings().home, gpus=gpus, held_pid=held_pid)
    if profile is not None:
        warn_if_not_profile_machine(profile, snap)
    return snap


def warn_if_not_profile_machine(profile, snap) -> None:
    from launcher.profiles import differences, mismatch_warning

    found = differences(profile.hardware, snap)
    if found:
        render.warning(mismatch_warning(profile.name, found))


def plan_request(settings: Settings, *, hardware, profile=None, gpus=None, held_pid=None, **flags):
    """Merge CLI flags over the settings tree (profile < env LLMUP_PLANNING__*) into a
    PlanRequest. A pinned model (flag, env or profile) lifts any size cap."""
    from launcher.planning.request import request_from_settings

    context = flags.get("context")
    if context is not None and context <= 0:
        raise UsageError(f"--context must be a positive number of tokens, got {context}")
    cfg = settings.planning
    snap = hardware_snapshot(hardware, gpus if gpus is not None else cfg.gpus, profile, held_pid)
    if settings.runtime == "docker":  # the backend runs in llmup's image, not this Python
        from launcher.hardware.images import in_image

        snap = in_image(snap, settings.docker.cpu_image, settings.docker.cuda_image)
    return request_from_settings(cfg, snap, **flags, home=settings.home)


def detect(gpus: GpusOpt = None, json_out: JsonOpt = False) -> None:
    """Show this machine's GPUs, unified memory, RAM, cores, CPU speed and installed backends."""
    snap = hardware_snapshot(None, gpus if gpus is not None else default_settings().planning.gpus)
    render.print_json(snap) if json_out else render.snapshot(snap)


@with_plan_flags
def plan(flags: PlanFlags, json_out: JsonOpt = False) -> None:
    """Pick the largest model and highest precision that fit, with memory and speed."""
    from launcher.planning.planner import make_plan

    settings, chosen_profile = command_settings(flags.profile)
    req = plan_request(settings, profile=chosen_profile, **flags.planning())
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
    from launcher.calibration.records import compare, lookup

    record = lookup(home, plan)
    if record is not None:
        plan.measured = {
            "recorded_at": record.recorded_at,
            "figures": [f.model_dump() for f in compare(record)],
            "speed": record.speed,
        }


def chosen_plan(
    plan_file: Path | None, settings: Settings, profile=None, held_pid=None, **planning
):
    """The saved plan when given, else a fresh one from the same options `llmup plan` takes
    (`held_pid`: see `hardware_snapshot`)."""
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
    return make_plan(plan_request(settings, profile=profile, held_pid=held_pid, **planning))


@with_plan_flags
def pull(
    flags: PlanFlags,
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

    settings, chosen_profile = command_settings(flags.profile)
    chosen = chosen_plan(
        plan_file,
        settings,
        chosen_profile,
        **flags.planning(),
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


def profiles(json_out: JsonOpt = False) -> None:
    """List the machine profiles with the plan each gets on its own hardware."""
    from launcher.profiles.listing import profile_plans

    rows = profile_plans(default_settings().home)
    if json_out:
        render.print_json({"profiles": [row.to_dict() for row in rows]})
    else:
        render.profiles(rows)


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
