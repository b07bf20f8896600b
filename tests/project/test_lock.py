"""The lock of tested versions stays the truth: it pins every dependency pyproject.toml names,
inside its range, with hashes; the runtime lock is the test lock's versions; and the README's
set-up commands and CI install from it."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def pins(name: str) -> dict[str, tuple[str, list[str]]]:
    """Each package the lock pins for this interpreter: its version and its hashes."""
    found: dict[str, tuple[str, list[str]]] = {}
    for entry in re.split(r"\n(?=[A-Za-z0-9])", (ROOT / name).read_text()):
        if not entry[:1].isalnum():
            continue
        head, *rest = entry.split("\\\n")
        req = Requirement(head.strip())
        if req.marker is not None and not req.marker.evaluate():
            continue
        (spec,) = req.specifier
        assert spec.operator == "==", head
        hashes = re.findall(r"--hash=sha256:([0-9a-f]{64})", "".join(rest))
        found[canonicalize_name(req.name)] = (spec.version, hashes)
    return found


def wanted(extra: str | None) -> list[Requirement]:
    reqs = [Requirement(r) for r in PYPROJECT["dependencies"]]
    if extra:
        reqs += [Requirement(r) for r in PYPROJECT["optional-dependencies"][extra]]
    return [r for r in reqs if r.marker is None or r.marker.evaluate()]


@pytest.mark.parametrize(("lock", "extra"), [("requirements.txt", None),
                                             ("requirements-test.txt", "test")])  # fmt: skip
def test_the_lock_pins_every_dependency_inside_its_range_with_hashes(lock, extra):
    locked = pins(lock)
    for req in wanted(extra):
        version, _ = locked[canonicalize_name(req.name)]
        assert req.specifier.contains(version, prereleases=True), (lock, req, version)
    assert all(hashes for _, hashes in locked.values())


def test_the_runtime_lock_is_the_tested_versions():
    runtime, tested = pins("requirements.txt"), pins("requirements-test.txt")
    assert {name: v for name, (v, _) in runtime.items()} == {
        name: tested[name][0] for name in runtime
    }


def test_runtime_dependencies_have_an_upper_bound():
    for req in wanted(None):
        assert any(s.operator == "<" for s in req.specifier), req


def test_the_readme_and_ci_install_from_the_lock():
    readme = (ROOT / "README.md").read_text()
    main, tests = re.findall(r"```bash\n(python3 -m venv.*|.*apt-get.*)\n```", readme)[:2]
    assert "pip install -r requirements.txt && pip install --no-deps ." in main
    assert "llmup serve --auto" in main
    assert "pip install -r requirements-test.txt && pip install --no-deps -e ." in tests
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install -q -r requirements-test.txt" in ci
    assert "pip install -q --no-deps -e ." in ci
    assert tests.endswith("python -m pytest -q -n 2") and "\npython -m pytest -q -n 2\n" in ci
