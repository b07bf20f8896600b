"""Weight repacking, a switch both llama.cpp workers honour (`--repack auto|on|off`).

llama.cpp copies CPU-resident weights into "extra buffer types" (CPU_REPACK, AMX) for faster
matmuls. On CPUs with AMX, this llama.cpp build crashes on the first token of a quantized
model in ggml_backend_amx_mul_mat (llama.cpp issue #20824), so `auto` turns repacking off on
AMX CPUs and keeps it elsewhere.
"""

from __future__ import annotations

from pathlib import Path


def cpu_has_amx(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True when the CPU advertises AMX tiles (Sapphire Rapids and later Xeons)."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return False
    return any(line.startswith("flags") and " amx_int8" in line for line in text.splitlines())


def repack_enabled(choice: str, *, amx: bool) -> bool:
    if choice == "auto":
        return not amx
    return choice == "on"
