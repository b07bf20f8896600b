"""What a plan is asked for: the hardware and every option `llmup plan` takes.

It sits beside the plan contract (`plan.py`) so the planner and the code that turns a
candidate into a Plan both read it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from launcher.errors import UsageError
from launcher.hardware.snapshot import HardwareSnapshot
from launcher.settings import MODEL_CHOICE, PlanningSettings, without_model_choice

# llama.cpp KV cache type -> the exllamav2 cache mode of the same precision
KV_TO_EXL = {"f16": "FP16", "q8_0": "Q8", "q4_0": "Q4"}
BackendChoice = Literal["auto", "llama.cpp", "exllamav2"]
LlamaCppImpl = Literal["slots", "server"]
MAX_PARALLEL = 64  # sequences one llama.cpp context may be asked for


@dataclass(frozen=True)
class PlanRequest:
    hardware: HardwareSnapshot
    model: str | None = None
    max_model: str | None = None  # a size cap ("13b"), ignored when `model` pins one
    backend: BackendChoice = "auto"
    context: int = 4096
    kv_cache: str = "f16"
    flash_attn: str = "auto"  # llama.cpp's flash attention: auto, on or off
    reserve_mib: int = 1024
    ram_reserve_mib: int = 1024
    allow_offload: bool = False
    model_file: Path | None = None
    n_batch: int = 512
    n_ubatch: int = 512
    min_tokens_per_s: float | None = None
    readable_tokens_per_s: float = 5.0  # slower than this, the plan says so
    parallel: int | None = None  # llama.cpp sequences; None: as many as fit (1..8)
    llamacpp_impl: LlamaCppImpl = "slots"
    home: Path | None = None  # where a --model-file's header facts are kept (None: read it)

    @property
    def fixed_parallel(self) -> int | None:
        """The sequences asked for; None when the planner picks."""
        return 1 if self.llamacpp_impl == "server" else self.parallel

    def validate(self) -> None:
        if self.context <= 0:
            raise UsageError(f"--context must be a positive number of tokens, got {self.context}")
        if self.kv_cache not in KV_TO_EXL:
            raise UsageError(
                f"--kv-cache must be one of {', '.join(KV_TO_EXL)}, got {self.kv_cache!r}"
            )
        self._validate_flash_attn()
        if self.reserve_mib < 0 or self.ram_reserve_mib < 0:
            raise UsageError("--reserve-mib must not be negative")
        if self.backend not in ("auto", "llama.cpp", "exllamav2"):
            raise UsageError(
                f"--backend must be auto, llama.cpp or exllamav2, got {self.backend!r}"
            )
        if self.min_tokens_per_s is not None and self.min_tokens_per_s < 0:
            raise UsageError(
                f"--min-tokens-per-s must not be negative, got {self.min_tokens_per_s:g}"
            )
        if not self.readable_tokens_per_s > 0:
            raise UsageError(
                "planning.readable_tokens_per_s must be a positive speed, got "
                f"{self.readable_tokens_per_s:g}"
            )
        if self.model_file and self.backend == "exllamav2":
            raise UsageError("--model-file plans a GGUF file, which exllamav2 does not load")
        self._validate_parallel()

    def _validate_flash_attn(self) -> None:
        if self.flash_attn not in ("auto", "on", "off"):
            raise UsageError(f"--flash-attn must be auto, on or off, got {self.flash_attn!r}")

    def _validate_parallel(self) -> None:
        if self.llamacpp_impl not in ("slots", "server"):
            raise UsageError(f"--llamacpp-impl must be slots or server, got {self.llamacpp_impl!r}")
        if self.parallel is not None and not 1 <= self.parallel <= MAX_PARALLEL:
            raise UsageError(f"--parallel must be 1-{MAX_PARALLEL}, got {self.parallel}")
        if self.parallel not in (None, 1) and self.llamacpp_impl == "server":
            raise UsageError(
                "--parallel needs llmup's slot worker: llama-cpp-python's server "
                "(--llamacpp-impl server) serves one request at a time"
            )


def request_from_settings(
    cfg: PlanningSettings, hardware: HardwareSnapshot, **flags: Any
) -> PlanRequest:
    """The settings tree's planning values (defaults < profile < environment) with the
    CLI's flags over them; a flag left unset (None or False) does not count, and a model
    choice among the flags (`--model` or `--max-model`) replaces the one below. `gpus` is not
    part of the request: it already narrowed `hardware`."""
    given = {name: v for name, v in flags.items() if v is not None and v is not False}
    below = cfg.model_dump(exclude={"gpus"})
    if MODEL_CHOICE & given.keys():  # --max-model 7b is not lifted by a pin from below
        below = without_model_choice(below)
    return PlanRequest(hardware=hardware, **(below | given))
