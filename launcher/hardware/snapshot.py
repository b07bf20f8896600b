"""The hardware snapshot: the value detection produces and planning consumes.

Field names are the contract of DESIGN.md ("Hardware snapshot"); `llmup detect --json`
writes it and every planning command reads it back with `--hardware FILE`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from launcher.errors import HardwareSnapshotError


class Gpu(BaseModel):
    model_config = ConfigDict(extra="ignore")

    index: int = Field(ge=0)
    vendor: Literal["nvidia", "apple"]
    name: str
    memory_total_mib: int = Field(ge=0)
    memory_free_mib: int = Field(ge=0)
    memory_used_mib: int | None = Field(default=None, ge=0)
    compute_capability: str | None = None

    @property
    def device(self) -> str:
        """The device name used in plans: cuda:N for NVIDIA, metal:N for Apple."""
        return f"{'cuda' if self.vendor == 'nvidia' else 'metal'}:{self.index}"


class SystemInfo(BaseModel):
    model_config = ConfigDict(extra="ignore")

    os: str
    arch: str
    cpu_cores: int = Field(ge=1)
    ram_total_mib: int = Field(ge=0)
    ram_available_mib: int = Field(ge=0)
    cpu_threads: int | None = Field(default=None, ge=1)


class UnifiedMemory(BaseModel):
    model_config = ConfigDict(extra="ignore")

    ram_total_mib: int = Field(ge=0)
    gpu_budget_mib: int = Field(ge=0)


class HardwareSnapshot(BaseModel):
    model_config = ConfigDict(extra="ignore")

    gpus: list[Gpu] = Field(default_factory=list)
    system: SystemInfo
    unified_memory: UnifiedMemory | None = None

    @property
    def nvidia_gpus(self) -> list[Gpu]:
        return [g for g in self.gpus if g.vendor == "nvidia"]

    @property
    def is_apple(self) -> bool:
        return self.unified_memory is not None or any(g.vendor == "apple" for g in self.gpus)


def load_snapshot(path: str | Path) -> HardwareSnapshot:
    """Read a snapshot written by `llmup detect --json` (or by hand)."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise HardwareSnapshotError(
            f"hardware file {path} does not exist; write one with `llmup detect --json > {path}`"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HardwareSnapshotError(f"hardware file {path} is not valid JSON: {exc}") from None
    try:
        return HardwareSnapshot.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise HardwareSnapshotError(
            f"hardware file {path} does not follow the snapshot schema: {where}: {first['msg']}"
        ) from None
