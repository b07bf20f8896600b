"""The package graph: imports run down the layers of pyproject.toml's [tool.importlinter]
(drawn in docs/architecture.md), never back up and never round; a worker process imports no
module of the launcher's side, and the proxy knows the backend only through `launcher.served`.
import-linter checks it here and in .ci/run."""

from __future__ import annotations

import sys
from pathlib import Path

import grimp
import pytest
from importlinter.cli import lint_imports

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
CONFIG = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]

# The imports that ran back up before the packages were split (issue 20), each now illegal.
BACK_UP = [
    ("launcher.planning.catalog_candidates", "launcher.weights.pull"),
    ("launcher.listen", "launcher.backends.spec"),
    ("launcher.catalog.gguf_file", "launcher.planning.plan"),
    ("launcher.backends.launch.llamacpp_python", "launcher.calibration.records"),
    ("launcher.proxy.worker_slots", "launcher.serve"),
]


def test_the_import_contracts_hold(capsys):
    assert lint_imports(str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True) == 0
    report = capsys.readouterr().out
    assert f"Contracts: {len(CONFIG['contracts'])} kept, 0 broken." in report, report


def layers() -> list[grimp.Layer]:
    (contract,) = [c for c in CONFIG["contracts"] if c["type"] == "layers"]
    return [grimp.Layer(*(m.strip() for m in line.split("|"))) for line in contract["layers"]]


@pytest.mark.parametrize(("importer", "imported"), BACK_UP)
def test_an_import_back_up_breaks_the_layers(importer, imported):
    graph = grimp.build_graph("launcher")
    assert not graph.find_illegal_dependencies_for_layers(layers())
    graph.add_import(importer=importer, imported=imported)
    broken = graph.find_illegal_dependencies_for_layers(layers())
    assert {(d.importer, d.imported) for d in broken}, (importer, imported)


def test_a_worker_importing_the_launcher_side_is_forbidden():
    workers = ["launcher.workers"]
    (contract,) = [c for c in CONFIG["contracts"] if c.get("source_modules") == workers]
    graph = grimp.build_graph("launcher")
    for forbidden in contract["forbidden_modules"]:
        assert not graph.find_shortest_chains("launcher.workers", forbidden)
    graph.add_import(importer="launcher.workers.backend_key", imported="launcher.backends.spec")
    assert graph.find_shortest_chains("launcher.workers", "launcher.backends")
