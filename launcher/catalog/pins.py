"""Which commit of each hub source llmup downloads: the pins.

A branch moves: a new upstream commit that only edits a README would otherwise change what
`pull` resolves `main` to, and llmup keeps its verification records and joined files per
commit. So every source (repository, revision) is pinned to a commit, and downloads use the
pin, never the branch head:

- the package ships `pins.json` next to this module (filled by a maintainer with
  `llmup pins refresh --catalog`); `LLMUP_PINS_FILE` names another file to start from
  instead (an organisation's vetted commits, or none at all);
- a pin in the llmup home's `pins.json` overrides it; `llmup pins refresh` writes there
  after asking the hub where each branch points now;
- a source with no pin at all is pinned on its first successful pull to the commit that
  pull used (trust on first use), so it too stays put until refreshed.

Nothing here talks to the hub: `refresh` takes the lookup as a function.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from launcher.catalog.loader import Catalog
from launcher.errors import LlmupError
from launcher.jsonfile import write_text_atomic
from launcher.private import FILE_MODE

log = logging.getLogger(__name__)

PINS_FILE = "pins.json"
SHIPPED_MODE = 0o644  # the package's own file is read by every user
SHIPPED = Path(str(resources.files("launcher.catalog") / PINS_FILE))
ABOUT = (
    "Commit of each hub source llmup downloads, as {repo_id: {revision: commit}}; "
    "`llmup pins refresh` updates it from the hub."
)
_COMMIT = re.compile(r"[0-9a-f]{40}")

Lookup = Callable[[str, str], str]  # (repo_id, revision) -> commit the hub has now


def shipped_path() -> Path:
    """The pins to start from: LLMUP_PINS_FILE as set now, else the package's."""
    return Path(os.environ.get("LLMUP_PINS_FILE") or SHIPPED)


def is_commit(revision: str) -> bool:
    return isinstance(revision, str) and _COMMIT.fullmatch(revision) is not None


def read_pins(path: Path) -> dict[str, dict[str, str]]:
    """The pins of one file; a missing or unreadable file pins nothing (and says so)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("ignoring the pins file %s: %s", path, exc)
        return {}
    pins = data.get("pins", {}) if isinstance(data, dict) else {}
    return {
        repo: {rev: sha for rev, sha in revs.items() if isinstance(sha, str) and is_commit(sha)}
        for repo, revs in pins.items()
        if isinstance(revs, dict)
    }


def write_pins(path: Path, pins: dict[str, dict[str, str]], *, shipped: bool = False) -> None:
    """Atomically: a crash never leaves half a pins file. The home's is private (0600); the
    file shipped in the package (`shipped`) is for every user (0644)."""
    body = {"about": ABOUT, "pins": {r: dict(sorted(v.items())) for r, v in sorted(pins.items())}}
    mode = SHIPPED_MODE if shipped else FILE_MODE
    write_text_atomic(path, json.dumps(body, indent=1) + "\n", mode=mode)


@dataclass
class Pins:
    """The shipped pins with the home's laid over them; `record` writes to the home's."""

    path: Path
    shipped: dict[str, dict[str, str]] = field(default_factory=dict)
    local: dict[str, dict[str, str]] = field(default_factory=dict)

    @classmethod
    def load(cls, home: Path, shipped: Path | None = None) -> Pins:
        path = Path(home) / PINS_FILE
        return cls(path, read_pins(shipped or shipped_path()), read_pins(path))

    def commit(self, repo_id: str, revision: str) -> str | None:
        """The pinned commit of repo_id@revision; a revision that is a commit pins itself."""
        if is_commit(revision):
            return revision
        return self.local.get(repo_id, {}).get(revision) or self.shipped.get(repo_id, {}).get(
            revision
        )

    def record(self, repo_id: str, revision: str, commit: str) -> None:
        """Pin repo_id@revision to commit in the home's file."""
        self.local.setdefault(repo_id, {})[revision] = commit
        write_pins(self.path, self.local)


@dataclass(frozen=True)
class PinChange:
    repo_id: str
    revision: str
    old: str | None
    new: str | None
    error: str | None = None


def catalog_sources(catalog: Catalog) -> list[tuple[str, str]]:
    """Every (repository, revision) the catalog downloads from: GGUF repos and GPTQ branches."""
    sources: list[tuple[str, str]] = []
    for spec in catalog.models:
        if spec.gguf is not None:
            sources.append((spec.gguf.repo_id, spec.gguf.revision))
        if spec.gptq is not None:
            sources += [(spec.gptq.repo_id, v.branch) for v in spec.gptq.variants]
    return list(dict.fromkeys(sources))


def refresh(
    pins: Pins, sources: Iterable[tuple[str, str]], lookup: Lookup, *, into: Path | None = None
) -> list[PinChange]:
    """Ask `lookup` where each source points now and pin it there (in the home's file, or
    in `into`, e.g. the shipped file). A source the lookup fails for keeps its pin."""
    target = read_pins(into) if into is not None else pins.local
    changes = []
    for repo_id, revision in sources:
        old = pins.commit(repo_id, revision)
        try:
            new = lookup(repo_id, revision)
        except LlmupError as exc:  # one unreachable source must not stop the others
            changes.append(PinChange(repo_id, revision, old, None, str(exc).splitlines()[0]))
            continue
        target.setdefault(repo_id, {})[revision] = new
        changes.append(PinChange(repo_id, revision, old, new))
    write_pins(into or pins.path, target, shipped=into is not None)
    return changes
