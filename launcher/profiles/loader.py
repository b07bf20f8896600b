"""Machine profiles: a hardware snapshot plus pinned settings, one TOML file per machine.

The profiles that ship with llmup live in the repository's top-level `profiles/` folder,
which the package carries as `launcher/profiles/data` (a link to it in the source tree, real
files in a built wheel), so `llmup profiles` works after a plain `pip install`. A user's own
profiles go in `<llmup home>/profiles/`; a file there shadows a shipped one of the same name,
and `--profile` also takes a path to a `.toml` file.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from launcher.errors import ProfileError
from launcher.hardware.snapshot import HardwareSnapshot
from launcher.settings import DockerSettings, PlanningSettings, ProxySettings

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 (the CUDA image's Ubuntu 22.04)
    import tomli as tomllib

SUFFIX = ".toml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Planning(PlanningSettings, _Strict):
    pass


class _Proxy(ProxySettings, _Strict):
    pass


class _Docker(DockerSettings, _Strict):
    pass


class ProfileSettings(_Strict):
    """The part of the settings tree a profile may pin (the same names as LLMUP_* uses)."""

    planning: _Planning = Field(default_factory=_Planning)
    proxy: _Proxy = Field(default_factory=_Proxy)
    docker: _Docker = Field(default_factory=_Docker)
    runtime: Literal["local", "docker"] = "local"


class Profile(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
    description: str
    hardware: HardwareSnapshot
    settings: ProfileSettings = Field(default_factory=ProfileSettings)

    # where it was read from, and the settings exactly as written (the layer Settings gets)
    path: Path | None = Field(default=None, exclude=True)
    pinned: dict[str, Any] = Field(default_factory=dict, exclude=True)

    @property
    def accelerator(self) -> str:
        """The image a container of this machine needs: cuda, or cpu (Apple included:
        containers have no Metal)."""
        return "cuda" if self.hardware.nvidia_gpus else "cpu"


def shipped_dir() -> Path:
    return Path(str(resources.files("launcher.profiles") / "data"))


def user_dir(home: Path) -> Path:
    return home / "profiles"


def load_profile(path: Path) -> Profile:
    """Read and check one profile file; ProfileError (exit 2) names the file and the key."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ProfileError(f"profile file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"cannot read profile file {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"profile file {path} is not valid TOML: {exc}") from None
    _refuse_secrets(path, raw)
    try:
        profile = Profile.model_validate(raw)
    except ValidationError as exc:
        raise ProfileError(_first_problem(path, exc)) from None
    if profile.name != path.stem:
        raise ProfileError(
            f"profile file {path}: name = {profile.name!r} must match the file name ({path.stem!r})"
        )
    profile.path, profile.pinned = path, raw.get("settings", {})
    return profile


def _first_problem(path: Path, exc: ValidationError) -> str:
    first = exc.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "(top level)"
    if first["type"] == "extra_forbidden":
        return f"profile file {path}: unknown setting {key}"
    if first["type"] == "missing":
        return f"profile file {path}: {key} is missing"
    return f"profile file {path}: {key}: {first['msg']}"


def _refuse_secrets(path: Path, raw: dict[str, Any]) -> None:
    proxy = raw.get("settings", {}).get("proxy", {})
    if isinstance(proxy, dict) and "api_keys" in proxy:
        raise ProfileError(
            f"profile file {path}: settings.proxy.api_keys does not belong in a profile "
            "(profiles are shared); set LLMUP_API_KEY or settings.proxy.api_keys_file"
        )


def profile_files(home: Path) -> dict[str, Path]:
    """Every known profile by name: the shipped ones, then the user's (which win)."""
    found: dict[str, Path] = {}
    for folder in (shipped_dir(), user_dir(home)):
        if folder.is_dir():
            found.update({p.stem: p for p in sorted(folder.glob(f"*{SUFFIX}"))})
    return dict(sorted(found.items()))


def find_profile(name: str, home: Path) -> Profile:
    """A profile by name, or by the path of a `.toml` file."""
    if name.endswith(SUFFIX) or "/" in name:
        return load_profile(Path(name))
    files = profile_files(home)
    if name not in files:
        known = ", ".join(files) or "none"
        raise ProfileError(
            f"unknown profile {name!r}; known profiles: {known} "
            f"(or pass the path of a .toml file; list them with `llmup profiles`)"
        )
    return load_profile(files[name])


def all_profiles(home: Path) -> Iterator[Profile]:
    for path in profile_files(home).values():
        yield load_profile(path)
