"""The `llmup` command line: thin commands that parse, call one core function, and render
(rich) or print --json.

Errors llmup anticipates (LlmupError) become one line on stderr and the exit code of
their class: 2 bad input, 3 nothing fits, 1 otherwise. Never a traceback.
"""

from __future__ import annotations

import logging
import sys

import typer

from launcher import render
from launcher.backends.supervise.headstart import HeadStart
from launcher.cli import commands, pinning, serving
from launcher.errors import LlmupError

app = typer.Typer(
    help="Serve the largest Llama-2 this machine can hold behind an OpenAI-compatible API.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
for command in (
    commands.detect,
    commands.plan,
    commands.pull,
    serving.serve,
    commands.profiles,
    commands.estimate,
):
    app.command()(command)
app.add_typer(pinning.pins_app, name="pins")


def main(headstart: HeadStart | None = None) -> None:
    """The command line; `headstart` (`llmup serve`'s early backend) reaches serve as the
    click context's `obj`."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app(obj=headstart)
    except LlmupError as exc:
        render.error(str(exc))
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        render.error("interrupted")
        sys.exit(130)
