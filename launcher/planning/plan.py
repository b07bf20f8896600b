"""The plan: what `llmup plan --json` prints and `pull`/`serve` consume.

Field names follow docs/architecture.md ("Plan"); add fields freely, rename none.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from launcher.errors import UsageError
from launcher.served import WorkerKind

Backend = Literal["llama.cpp", "exllamav2"]


class PlannedModel(BaseModel):
    id: str
    params: int
    label: str | None = None
    chat_format: str | None = None
    # Whether a planned local GGUF carries its own chat template, read with the header at
    # planning so the launch need not read the file again (None: not read; a download).
    gguf_chat_template: bool | None = None


class JoinSpec(BaseModel):
    """Raw byte halves that must be concatenated, in order, into `output`."""

    output: str
    parts: list[str]


class Source(BaseModel):
    """Where the weights come from: a hub repo and revision, or a local file."""

    model_config = ConfigDict(extra="allow")

    repo_id: str | None = None
    revision: str = "main"
    files: list[str] = Field(default_factory=list)
    download_bytes: int = 0
    join: JoinSpec | None = None
    local_path: str | None = None


class DeviceNeed(BaseModel):
    """One GPU of the placement; `device` names the physical GPU (cuda:N is nvidia-smi's
    index N), which the launch makes visible, in this order."""

    device: str
    need_mib: int
    budget_mib: int
    layers: int = 0
    breakdown_mib: dict[str, int] = Field(default_factory=dict)
    name: str | None = None
    uuid: str | None = None


class LeftOut(BaseModel):
    """A GPU of the machine the plan does not use, and why."""

    device: str
    reason: str


class Placement(BaseModel):
    n_gpu_layers: int = 0
    tensor_split: list[float] = Field(default_factory=list)
    devices: list[DeviceNeed] = Field(default_factory=list)
    ram_need_mib: int = 0
    ram_budget_mib: int = 0
    offload: Literal["full", "partial", "cpu"] = "full"
    left_out: list[LeftOut] = Field(default_factory=list)


class Speed(BaseModel):
    """Expected speed: decode at the start of a conversation (batch 1), a 512-token prompt.

    None where a device's figures are unknown; `basis` says which figures were used;
    `assumed`: some of them are a described machine's typical figures, not measured.
    """

    decode_tokens_per_s: float | None = None
    prompt_tokens_per_s: float | None = None
    basis: list[str] = Field(default_factory=list)
    assumed: bool = False


class FasterChoice(BaseModel):
    """What `flag` (a `--min-tokens-per-s` value) serves instead: the candidate the planner
    then picks, and its expected decode speed."""

    model: str
    quant: str
    backend: Backend
    decode_tokens_per_s: float
    flag: str


class SpeedWarning(BaseModel):
    """The chosen candidate is expected to decode slower than people read
    (`readable_tokens_per_s`, a planning setting): "the largest that fits" stays the policy,
    and this says so, naming what would be fast enough (`faster`, None when nothing that
    fits is faster)."""

    decode_tokens_per_s: float
    readable_tokens_per_s: float
    message: str
    faster: FasterChoice | None = None


class MemoryMiB(BaseModel):
    weights: int
    kv_cache: int
    compute: int
    overhead: int
    total: int


class Rejected(BaseModel):
    model: str
    quant: str
    backend: Backend
    reason: str
    miss_mib: int = 0
    decode_tokens_per_s: float | None = None
    prompt_tokens_per_s: float | None = None


class Settings(BaseModel):
    """Backend settings the plan assumed; the launcher must pass exactly these."""

    n_batch: int = 512
    n_ubatch: int = 512
    kv_cache_type: str = "f16"
    flash_attn: bool = False
    cache_mode: str | None = None  # exllamav2: FP16 / Q8 / Q6 / Q4
    # llama.cpp: llmup's session-slot worker ("slots") or llama-cpp-python's server
    llamacpp_impl: Literal["slots", "server"] | None = None
    slot_ram_mib: int = 0  # RAM the slot worker may fill with saved session states


class Plan(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: PlannedModel
    backend: Backend
    format: Literal["gguf", "gptq"]
    quant: str
    bits_per_weight: float
    source: Source
    context: int
    parallel: int = 1  # sequences the KV cache holds, each of `context` tokens
    placement: Placement
    memory_mib: MemoryMiB
    settings: Settings = Field(default_factory=Settings)
    speed: Speed | None = None
    speed_warning: SpeedWarning | None = None
    notes: list[str] = Field(default_factory=list)
    rejected: list[Rejected] = Field(default_factory=list)
    fallbacks: list[Plan] = Field(default_factory=list)

    @property
    def worker_kind(self) -> WorkerKind:
        """Which worker serves this plan: decided here once, for the launch and the proxy."""
        return WorkerKind.of(self.backend, self.settings.llamacpp_impl)


def load_plan(path: str | Path) -> Plan:
    """Read a plan saved from `llmup plan --json`."""
    path = Path(path)
    try:
        return Plan.model_validate(json.loads(path.read_text()))
    except FileNotFoundError:
        raise UsageError(
            f"plan file {path} does not exist; save one with `llmup plan --json > {path}`"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"plan file {path} is not valid JSON: {exc}") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise UsageError(f"plan file {path} is not a plan: {where}: {first['msg']}") from None
