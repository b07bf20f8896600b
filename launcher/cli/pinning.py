"""`llmup pins`: the commit each hub source is pinned to, shown and refreshed."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

import typer

from launcher import render
from launcher.cli.options import JsonOpt
from launcher.errors import LlmupError, UsageError

pins_app = typer.Typer(
    help="The commit each hub source is pinned to: what `pull` downloads, whatever the branch "
    "does meanwhile.",
    no_args_is_help=True,
)


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
