"""Known GPUs and Apple chips with their peak memory bandwidth and throughput (devices.json),
and typical CPU memory systems and core classes for machines that are described, not measured.

The speed estimate looks devices up by the name detection reports (nvidia-smi/NVML, sysctl);
a device not in the table gets no speed figure rather than a guessed one. A CPU's speed is
measured by `llmup detect`; a machine profile written for another machine names its memory
(`system.ram_type`, "DDR4-3200 dual channel") and core class (a word of `system.cpu_name`,
"AVX2"), and the planner takes their typical figures, marked as assumed.
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from launcher.errors import CatalogError


class _Entry(BaseModel):
    """A table entry: what it is, the lower-case names that match it, where its figure is from."""

    model_config = ConfigDict(extra="forbid")

    name: str
    match: list[str] = Field(min_length=1)
    source: str


class DeviceSpec(_Entry):
    kind: Literal["cuda", "metal"]
    bandwidth_gbs: float = Field(gt=0)
    tflops: float | None = Field(default=None, gt=0)


class MemorySpec(_Entry):
    """A CPU memory system: DDR generation, speed grade and channels; its peak bandwidth."""

    bandwidth_gbs: float = Field(gt=0)


class CoreSpec(_Entry):
    """A CPU core class and the FP32 GFLOPS one such core sustains in a matrix multiply."""

    gflops: float = Field(gt=0)


class DeviceTable(BaseModel):
    model_config = ConfigDict(extra="forbid")

    about: list[str] = []
    devices: list[DeviceSpec]
    cpu_memory: list[MemorySpec] = []
    cpu_cores: list[CoreSpec] = []

    def lookup(self, name: str) -> DeviceSpec | None:
        """The entry whose longest `match` substring occurs in `name` as whole words."""
        return _best(self.devices, name)

    def memory(self, ram_type: str) -> MemorySpec | None:
        """The memory system a description names ("DDR5-5600 dual channel")."""
        return _best(self.cpu_memory, ram_type)

    def core(self, cpu_name: str) -> CoreSpec | None:
        """The core class a CPU description names ("8-core desktop x86-64, AVX2")."""
        return _best(self.cpu_cores, cpu_name)


Spec = TypeVar("Spec", bound=_Entry)


def _best(specs: list[Spec], name: str) -> Spec | None:
    text = " ".join(name.lower().split())
    best, best_len = None, 0
    for spec in specs:
        for pattern in spec.match:
            if len(pattern) > best_len and _contains_word(text, pattern):
                best, best_len = spec, len(pattern)
    return best


def _contains_word(text: str, pattern: str) -> bool:
    return re.search(rf"(?<![a-z0-9]){re.escape(pattern)}(?![a-z0-9])", text) is not None


@cache
def device_table() -> DeviceTable:
    raw = (resources.files("launcher.catalog") / "devices.json").read_text()
    try:
        return DeviceTable.model_validate_json(raw)
    except ValueError as exc:
        raise CatalogError(f"catalog file devices.json is malformed: {exc}") from None
