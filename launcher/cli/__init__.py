"""The `llmup` command line (entry point `main`)."""

from launcher.cli.commands import app, main

__all__ = ["app", "main"]
