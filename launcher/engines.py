"""Facts about the inference engines that both sides of the process boundary use: the launch
writes them into a worker's flags, the worker reads them back (and the planner sizes by them).

The ggml type ids are part of the GGUF format; the cache modes are exllamav2's; the thread
count is what llama.cpp should get on this machine.
"""

from __future__ import annotations

import os

import psutil

from launcher.errors import UsageError

# ggml_type ids, as llama_cpp.GGML_TYPE_* (a test checks them against the installed module;
# they are part of the GGUF format, so they do not move between releases).
GGML_TYPES = {
    "f32": 0,
    "f16": 1,
    "q4_0": 2,
    "q4_1": 3,
    "q5_0": 6,
    "q5_1": 7,
    "q8_0": 8,
    "iq4_nl": 20,
    "bf16": 30,
}

# exllamav2's KV cache modes (the exllamav2 worker's --cache-mode)
CACHE_MODES = ("FP16", "Q8", "Q6", "Q4")


def kv_type_id(name: str) -> int:
    try:
        return GGML_TYPES[name.lower()]
    except KeyError:
        raise UsageError(
            f"KV cache type {name!r} is not one llama.cpp accepts ({', '.join(GGML_TYPES)})"
        ) from None


def physical_cores() -> int:
    """Physical cores this process may run on (affinity counts, e.g. in a container)."""
    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    if hasattr(os, "sched_getaffinity"):
        cores = min(cores, len(os.sched_getaffinity(0)))
    return max(cores, 1)
