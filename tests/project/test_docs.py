"""The project stands alone: its docs and code point to nothing outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Spelled in pieces so this file does not match itself.
OUTSIDE = re.compile("|".join(["\\.\\./" + "shared", "/work/" + "shared", "DESIGN" + "\\.md",
                               "reference " + "facts"]))  # fmt: skip


def project_files() -> list[Path]:
    files = [ROOT / "README.md", *ROOT.glob("docs/**/*.md")]
    for folder in ("launcher", "tests", "benchmarks"):
        files += [p for p in (ROOT / folder).rglob("*") if p.suffix in {".py", ".md", ".json"}]
    return files


def test_nothing_points_outside_the_repository():
    hits = [
        f"{path.relative_to(ROOT)}:{n}"
        for path in project_files()
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if OUTSIDE.search(line)
    ]
    assert hits == []


def test_the_readme_links_the_architecture_notes():
    assert "(docs/architecture.md)" in (ROOT / "README.md").read_text()
    notes = (ROOT / "docs" / "architecture.md").read_text()
    for contract in ("Hardware snapshot", "Plan (`llmup plan --json`)", "Planning policy"):
        assert contract in notes
