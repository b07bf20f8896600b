"""llama-cpp-python's OpenAI server, with the one switch its CLI lacks: weight repacking,
and llmup's additions (`launcher.backends.llamacpp_patches`: exact usage in streams, a
grammar llama.cpp refuses answered as an error instead of a crash, `GET /llmup/meta`).

Run as `python -m launcher.backends.llamacpp_worker [--repack auto|on|off] <llama_cpp.server
args>`. llama.cpp copies CPU-resident weights into "extra buffer types" (CPU_REPACK, AMX)
for faster matmuls. On CPUs with AMX, this llama.cpp build crashes on the first token of a
quantized model in ggml_backend_amx_mul_mat (llama.cpp issue #20824; reproduced here with
Q4_0, Q8_0 and Q4_K_M models), so `auto` turns repacking off on AMX CPUs and keeps it
elsewhere. Everything else is llama_cpp.server's own CLI, untouched.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def cpu_has_amx(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True when the CPU advertises AMX tiles (Sapphire Rapids and later Xeons)."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return False
    return any(line.startswith("flags") and " amx_int8" in line for line in text.splitlines())


def disable_weight_repack() -> None:
    """Make every model load with use_extra_bufts = False (llama_cpp.Llama has no option)."""
    import llama_cpp.llama_cpp as lib

    defaults = lib.llama_model_default_params

    def without_extra_buffers():
        params = defaults()
        params.use_extra_bufts = False
        return params

    lib.llama_model_default_params = without_extra_buffers


def repack_enabled(choice: str, *, amx: bool) -> bool:
    if choice == "auto":
        return not amx
    return choice == "on"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--repack", choices=("auto", "on", "off"), default="auto")
    ours, rest = parser.parse_known_args(argv if argv is not None else sys.argv[1:])
    if not repack_enabled(ours.repack, amx=cpu_has_amx()):
        disable_weight_repack()
        print("llmup worker: weight repacking off (AMX CPU or --repack off)", file=sys.stderr)
    from launcher.backends import llamacpp_patches

    llamacpp_patches.apply()  # before the server module binds create_app
    from llama_cpp.server.__main__ import main as server_main

    sys.argv = [sys.argv[0], *rest]
    server_main()


if __name__ == "__main__":
    main()
