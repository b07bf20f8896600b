"""The hardware snapshot: the value detection produces and planning consumes.

Field names are the contract of docs/architecture.md ("Hardware snapshot"); `llmup detect --json`
writes it and every planning command reads it back with `--hardware FILE`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_serializer

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
    uuid: str | None = None
    pci_bus_id: str | None = None

    @property
    def device(self) -> str:
        """The device name used in plans: cuda:N for NVIDIA, metal:N for Apple.

        N is the physical index (nvidia-smi's, which is PCI bus order), never a position in
        a filtered list: the launch makes exactly these indices visible, in plan order.
        """
        return f"{'cuda' if self.vendor == 'nvidia' else 'metal'}:{self.index}"


class SystemInfo(BaseModel):
    model_config = ConfigDict(extra="ignore")

    os: str
    arch: str
    cpu_cores: int = Field(ge=1)
    ram_total_mib: int = Field(ge=0)
    ram_available_mib: int = Field(ge=0)
    cpu_threads: int | None = Field(default=None, ge=1)
    cpu_name: str | None = None
    # a described machine's memory ("DDR4-3200 dual channel"): its typical bandwidth from the
    # device table stands in for the measurement below (marked as assumed); detect leaves it
    ram_type: str | None = None
    # measured once by `llmup detect` (cached in the llmup home); None when not measured
    memory_bandwidth_gbs: float | None = Field(default=None, gt=0)
    cpu_gflops: float | None = Field(default=None, gt=0)

    @model_serializer(mode="wrap")
    def _described_only(self, handler: Any) -> dict[str, Any]:
        """`ram_type` only where a machine is described: detect's snapshot stays as it was."""
        data = handler(self)
        if self.ram_type is None:
            data.pop("ram_type", None)
        return data


class UnifiedMemory(BaseModel):
    model_config = ConfigDict(extra="ignore")

    ram_total_mib: int = Field(ge=0)
    gpu_budget_mib: int = Field(ge=0)


class LlamaCppInstall(BaseModel):
    """The installed llama-cpp-python: which accelerators its llama.cpp was built with.

    `gpu_offload` is llama.cpp's own answer (llama_supports_gpu_offload): a GPU (or RPC)
    device is usable right now. `gpu_backends` names the compiled-in accelerators
    (cuda, metal, vulkan, hip, sycl...), from the shared libraries the package ships.
    """

    model_config = ConfigDict(extra="ignore")

    installed: bool = False
    version: str | None = None
    gpu_offload: bool = False
    gpu_backends: list[str] = Field(default_factory=list)
    rpc: bool = False
    error: str | None = None


class ExllamaInstall(BaseModel):
    """exllamav2 and the torch under it; `torch_cuda` is the CUDA torch was built for."""

    model_config = ConfigDict(extra="ignore")

    installed: bool = False
    version: str | None = None
    torch: str | None = None
    torch_cuda: str | None = None

    @property
    def usable(self) -> bool:
        return self.installed and self.torch_cuda is not None


class InstalledBackends(BaseModel):
    model_config = ConfigDict(extra="ignore")

    llama_cpp: LlamaCppInstall = Field(default_factory=LlamaCppInstall)
    exllamav2: ExllamaInstall = Field(default_factory=ExllamaInstall)
    # None: this Python's packages; else where they are, e.g. "the llmup:cuda image"
    where: str | None = None


class HardwareSnapshot(BaseModel):
    model_config = ConfigDict(extra="ignore")

    gpus: list[Gpu] = Field(default_factory=list)
    system: SystemInfo
    unified_memory: UnifiedMemory | None = None
    # what is installed to use the hardware; None in a snapshot of another machine
    backends: InstalledBackends | None = None
    # how the GPU list was narrowed: "CUDA_VISIBLE_DEVICES=1" or "--gpus 0,2"
    gpus_selected_by: str | None = None

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
