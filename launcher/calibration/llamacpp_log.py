"""Parse llama.cpp's load log (stderr of a verbose load) into measured buffer sizes.

The load log is the ground truth the memory planner is checked against. Lines it reads
(current llama.cpp as bundled by llama-cpp-python 0.3.36, and older spellings):

    load_tensors:   CPU_Mapped model buffer size =    12.34 MiB     (also AMX, CPU_REPACK, CUDA0..)
    llm_load_tensors:        CPU buffer size =    70.31 MiB         (older: no "model")
    llama_kv_cache:        CPU KV buffer size =    16.00 MiB        (older: llama_kv_cache_init,
                                                                     llama_kv_cache_unified)
    llama_kv_cache: size = 0.25 MiB (512 cells, 2 layers, 1/1 seqs), K (f16): .., V (f16): ..
    llama_new_context_with_model: KV self size  = 2048.00 MiB, K (f16): 1024.00 MiB, V (f16): ..
    sched_reserve:        CPU compute buffer size =     1.69 MiB    (older: llama_context:,
                                                                     llama_new_context_with_model:)
    ~llama_context:        CPU compute buffer size is   3.4482 MiB, matches expectation of ..
    llama_context:        CPU  output buffer size =     0.12 MiB
    llama_context: n_ctx = 512 / n_ctx_seq (older n_ctx_per_seq) / n_batch / n_ubatch /
                   flash_attn = disabled|enabled|auto (older 0|1)
    resolve_fused_ops: Flash Attention enabled  (older: "Flash Attention was auto, set to ..")

Every "<device> <kind> buffer size" line is one allocated buffer, so repeated lines for the
same device add up (a split GGUF maps one buffer per file). Unknown lines are ignored.
Sizes are MiB (2^20 bytes) as printed, i.e. rounded to 0.01 MiB.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from pydantic import BaseModel, Field

_NUM = r"(-?\d+(?:\.\d+)?)"


def _num(name: str) -> str:
    """A named number group."""
    return rf"(?P<{name}>-?\d+(?:\.\d+)?)"


BUFFER_RE = re.compile(
    r"^\s*(?P<src>\w+):\s+(?P<dev>\S+)\s+(?:(?P<kind>\w+)\s+)?buffer size\s*=\s*"
    + _num("mib")
    + r"\s*MiB"
)
EXACT_COMPUTE_RE = re.compile(r"^\s*~\w+:\s+(?P<dev>\S+)\s+compute buffer size is\s*" + _num("mib"))
KV_SELF_RE = re.compile(r"\bKV self size\s*=\s*" + _NUM + r"\s*MiB", re.IGNORECASE)
KV_SPLIT_RE = re.compile(
    r"K \((?P<tk>\w+)\):\s*"
    + _num("k")
    + r"\s*MiB,\s*V \((?P<tv>\w+)\):\s*"
    + _num("v")
    + r"\s*MiB"
)
KV_CELLS_RE = re.compile(r"\(\s*(\d+) cells,\s*(\d+) layers,\s*(\d+)(?:/(\d+))? seqs\)")
KV_INIT_RE = re.compile(r"kv_size = (\d+),.*?type_k = '(\w+)', type_v = '(\w+)', n_layer = (\d+)")
CONTEXT_RE = re.compile(r"^(?:llama_context|llama_new_context_with_model):\s+(\w+)\s*=\s*(.+?)\s*$")
INFO_RE = re.compile(r"^(?:print_info|llm_load_print_meta):\s+(.+?)\s*=\s*(.*?)\s*$")
FLASH_RE = re.compile(r"Flash Attention (?:was auto, set to )?(enabled|disabled)")
OFFLOAD_RE = re.compile(r"offloaded (\d+)/(\d+) layers to GPU")
COPIES_RE = re.compile(r"pipeline parallelism enabled \(n_copies=(\d+)\)")
# Legacy totals without a device: (regex, kind, key).
LEGACY: tuple[tuple[re.Pattern[str], str, str], ...] = (
    (re.compile(r"compute buffer total size\s*=\s*" + _NUM + r"\s*MiB"), "compute", "total"),
    (re.compile(r"\bmem required\s*=\s*" + _NUM + r"\s*MiB"), "model", "mem required"),
)
KINDS = {"model": "model", "kv": "kv", "compute": "compute", "output": "output"}
TRUE_WORDS = {"enabled", "1", "true", "on"}
FALSE_WORDS = {"disabled", "0", "false", "off"}


class LoadBuffers(BaseModel):
    """Buffers one llama.cpp load allocated, MiB per buffer/device name, plus context facts."""

    model: dict[str, float] = Field(default_factory=dict)
    kv: dict[str, float] = Field(default_factory=dict)
    compute: dict[str, float] = Field(default_factory=dict)
    output: dict[str, float] = Field(default_factory=dict)
    other: dict[str, float] = Field(default_factory=dict, description="'kind device' -> MiB")
    compute_exact: dict[str, float] = Field(
        default_factory=dict, description="4-decimal compute sizes printed at teardown"
    )
    kv_self_mib: float | None = None
    kv_cells: int | None = None
    kv_layers: int | None = None
    kv_seqs: int | None = None
    type_k: str | None = None
    type_v: str | None = None
    k_mib: float | None = None
    v_mib: float | None = None
    flash_attn_resolved: bool | None = None
    offloaded_layers: int | None = None
    offloadable_layers: int | None = None
    n_copies: int | None = Field(None, description="pipeline-parallel compute copies")
    context: dict[str, str] = Field(default_factory=dict)
    model_info: dict[str, str] = Field(default_factory=dict)

    @property
    def model_total(self) -> float:
        return sum(self.model.values())

    @property
    def kv_total(self) -> float:
        """Per-device KV buffers; the old single "KV self size" line when none were printed."""
        if self.kv:
            return sum(self.kv.values())
        return self.kv_self_mib or 0.0

    @property
    def compute_total(self) -> float:
        return sum(self.compute.values())

    @property
    def output_total(self) -> float:
        return sum(self.output.values())

    @property
    def total(self) -> float:
        return self.model_total + self.kv_total + self.compute_total + self.output_total

    def _int(self, *keys: str) -> int | None:
        for key in keys:
            value = self.context.get(key, "").split()
            if value and value[0].lstrip("-").isdigit():
                return int(value[0])
        return None

    @property
    def n_ctx(self) -> int | None:
        return self._int("n_ctx")

    @property
    def n_ctx_seq(self) -> int | None:
        return self._int("n_ctx_seq", "n_ctx_per_seq")

    @property
    def n_batch(self) -> int | None:
        return self._int("n_batch")

    @property
    def n_ubatch(self) -> int | None:
        return self._int("n_ubatch")

    @property
    def n_seq_max(self) -> int | None:
        return self._int("n_seq_max")

    @property
    def kv_size(self) -> int | None:
        """KV cells (n_ctx after llama.cpp's padding), from the KV cache line or n_ctx."""
        return self.kv_cells if self.kv_cells is not None else self.n_ctx

    @property
    def flash_attn_setting(self) -> str | None:
        """The requested setting as logged: "enabled", "disabled", "auto" (older: "1"/"0")."""
        return self.context.get("flash_attn")

    @property
    def flash_attn(self) -> bool | None:
        """Whether flash attention is on: the "auto" resolution when logged, else the setting."""
        if self.flash_attn_resolved is not None:
            return self.flash_attn_resolved
        setting = (self.flash_attn_setting or "").lower()
        if setting in TRUE_WORDS:
            return True
        return False if setting in FALSE_WORDS else None


def _add(bucket: dict[str, float], key: str, mib: float) -> None:
    bucket[key] = round(bucket.get(key, 0.0) + mib, 6)


def _parse_buffer(line: str, out: LoadBuffers) -> bool:
    m = BUFFER_RE.match(line)
    if not m:
        return False
    kind = (m["kind"] or "").lower()
    if not kind and "load_tensors" in m["src"]:
        kind = "model"
    if kind in KINDS:
        _add(getattr(out, KINDS[kind]), m["dev"], float(m["mib"]))
    else:
        _add(out.other, f"{kind or 'unknown'} {m['dev']}".strip(), float(m["mib"]))
    return True


def _parse_kv(line: str, out: LoadBuffers) -> None:
    if m := KV_SELF_RE.search(line):
        out.kv_self_mib = float(m[1])
    kv_line = "KV self size" in line or ("kv_cache" in line and "cells" in line)
    if kv_line and (split := KV_SPLIT_RE.search(line)):
        out.type_k, out.type_v = split["tk"], split["tv"]
        out.k_mib, out.v_mib = float(split["k"]), float(split["v"])
    if m := KV_CELLS_RE.search(line):
        out.kv_cells, out.kv_layers = int(m[1]), int(m[2])
        out.kv_seqs = int(m[4] or m[3])
    if m := KV_INIT_RE.search(line):
        out.kv_cells, out.type_k, out.type_v = int(m[1]), m[2], m[3]
        out.kv_layers = int(m[4])


def _parse_misc(line: str, out: LoadBuffers) -> None:
    if m := EXACT_COMPUTE_RE.match(line):
        out.compute_exact[m["dev"]] = float(m["mib"])
    elif m := CONTEXT_RE.match(line):
        out.context[m[1]] = m[2]
    elif m := INFO_RE.match(line):
        out.model_info.setdefault(m[1], m[2])
    if m := FLASH_RE.search(line):
        out.flash_attn_resolved = m[1] == "enabled"
    if m := OFFLOAD_RE.search(line):
        out.offloaded_layers, out.offloadable_layers = int(m[1]), int(m[2])
    if m := COPIES_RE.search(line):
        out.n_copies = int(m[1])
    for regex, kind, key in LEGACY:
        if m := regex.search(line):
            _add(getattr(out, kind), key, float(m[1]))


def parse_load_lines(lines: Iterable[str]) -> LoadBuffers:
    """Parse log lines; see `parse_load_log`."""
    out = LoadBuffers()
    for raw in lines:
        line = raw.rstrip()
        if not _parse_buffer(line, out):
            _parse_kv(line, out)
            _parse_misc(line, out)
    return out


def parse_load_log(text: str) -> LoadBuffers:
    """Parse the stderr of a verbose llama.cpp load into `LoadBuffers`."""
    return parse_load_lines(text.splitlines())
