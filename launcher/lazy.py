"""A package's entry points resolved on first use (PEP 562 module `__getattr__`), so that
importing one light module of a package does not import its heavy neighbours."""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from typing import Any


def lazy_names(package: str, homes: dict[str, str]) -> Callable[[str], Any]:
    """The `__getattr__` of `package` that finds each name of `homes` in its module."""

    def __getattr__(name: str) -> Any:
        if name not in homes:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(import_module(homes[name]), name)

    return __getattr__
