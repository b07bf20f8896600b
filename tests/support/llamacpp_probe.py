"""Measure what llama.cpp allocates when it loads a model: load it in a subprocess with
llama-cpp-python (verbose), capture the load log from stderr and parse it.

Notes on llama-cpp-python 0.3.36:
- `Llama(flash_attn=...)` is a bool mapped to `flash_attn_type` ENABLED / DISABLED, so its
  default is *disabled*, not llama.cpp's own default (`LLAMA_FLASH_ATTN_TYPE_AUTO`). The probe
  reaches "auto" (what llama-server does) by making DISABLED mean AUTO inside the subprocess.
- `n_batch` is capped at `n_ctx` and `n_ubatch` at `n_batch` by the wrapper.
- Weight repacking into extra buffer types (CPU_REPACK, AMX) is on by default
  (`llama_model_params.use_extra_bufts`); `use_extra_bufts=False` turns it off.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal

from launcher.calibration.llamacpp_log import LoadBuffers, parse_load_log

FlashAttn = bool | Literal["auto"] | None

# ggml_type ids (llama_cpp.GGML_TYPE_*) of the KV cache types llama.cpp accepts.
KV_TYPES: dict[str, str] = {
    "f32": "GGML_TYPE_F32",
    "f16": "GGML_TYPE_F16",
    "bf16": "GGML_TYPE_BF16",
    "q8_0": "GGML_TYPE_Q8_0",
    "q4_0": "GGML_TYPE_Q4_0",
    "q4_1": "GGML_TYPE_Q4_1",
    "iq4_nl": "GGML_TYPE_IQ4_NL",
    "q5_0": "GGML_TYPE_Q5_0",
    "q5_1": "GGML_TYPE_Q5_1",
}

_CHILD = r"""
import json, sys
import llama_cpp
import llama_cpp.llama_cpp as C

opts = json.loads(sys.argv[1])
for module in opts["preload"]:
    __import__(module)
def status_kib(key):
    with open("/proc/self/status") as status:
        return next((line.split()[1] for line in status if line.startswith(key + ":")), "0")
print(f"llamacpp_probe: before_load_rss_kib {status_kib('VmRSS')}", file=sys.stderr)
kwargs = opts["kwargs"]
for key in ("type_k", "type_v"):
    kwargs[key] = getattr(C, opts[key])
if opts["flash_attn"] == "auto":
    C.LLAMA_FLASH_ATTN_TYPE_DISABLED = C.LLAMA_FLASH_ATTN_TYPE_AUTO
    kwargs["flash_attn"] = False
if not opts["use_extra_bufts"]:
    from launcher.workers.llamacpp_python.server import disable_weight_repack
    disable_weight_repack()
llm = llama_cpp.Llama(verbose=True, **kwargs)
if opts["eval_tokens"]:
    llm.eval([1] + [3 + i % (llm.n_vocab() - 3) for i in range(opts["eval_tokens"] - 1)])
print(f"llamacpp_probe: peak_rss_kib {status_kib('VmHWM')}", file=sys.stderr)
print("llamacpp_probe: loaded", file=sys.stderr, flush=True)
"""


def _child_options(
    path: Path,
    kwargs: dict[str, object],
    type_k: str,
    type_v: str,
    flash_attn: FlashAttn,
    use_extra_bufts: bool,
    extra: dict[str, Any],
) -> str:
    kv = {name: KV_TYPES[value.lower()] for name, value in (("type_k", type_k), ("type_v", type_v))}
    kwargs = dict(kwargs, model_path=str(path))
    if isinstance(flash_attn, bool):
        kwargs["flash_attn"] = flash_attn
    return json.dumps(
        {"kwargs": kwargs, **kv, "flash_attn": flash_attn, "use_extra_bufts": use_extra_bufts}
        | extra
    )


def run_load(
    path: str | Path,
    *,
    n_ctx: int,
    n_batch: int = 512,
    n_ubatch: int = 512,
    type_k: str = "f16",
    type_v: str = "f16",
    flash_attn: FlashAttn = None,
    n_gpu_layers: int = 0,
    use_extra_bufts: bool = True,
    use_mmap: bool = True,
    eval_tokens: int = 0,
    preload: tuple[str, ...] = (),
    timeout: float = 120,
) -> str:
    """Load the model in a fresh interpreter and return its stderr (the load log).

    `flash_attn`: None keeps llama-cpp-python's default (disabled), True / False force it,
    "auto" gives llama.cpp's own default. `eval_tokens` > 0 evaluates that many tokens after
    the load (so the compute buffers are used); `preload` modules are imported first (what a
    serving process has imported). The log carries the child's RSS before the load and its
    peak (`resident_bytes`). Raises RuntimeError when the load fails.
    """
    kwargs = {
        "n_ctx": n_ctx,
        "n_batch": n_batch,
        "n_ubatch": n_ubatch,
        "n_gpu_layers": n_gpu_layers,
        "use_mmap": use_mmap,
    }
    extra = {"eval_tokens": eval_tokens, "preload": list(preload)}
    options = _child_options(Path(path), kwargs, type_k, type_v, flash_attn, use_extra_bufts, extra)
    return _load_in_child(_CHILD, options, timeout, "llama.cpp load")


def _load_in_child(code: str, options: str, timeout: float, what: str) -> str:
    """Run a loading child; its stderr (the load log), or RuntimeError with its tail."""
    proc = subprocess.run(
        [sys.executable, "-c", code, options],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0 or "llamacpp_probe: loaded" not in proc.stderr:
        tail = "\n".join(proc.stderr.splitlines()[-20:])
        raise RuntimeError(f"{what} failed (rc={proc.returncode}):\n{tail}")
    return proc.stderr


_SLOTS_CHILD = r"""
import json, sys
from launcher.workers.llamacpp_slots.native import (
    ContextOptions, ModelOptions, NativeContext, NativeModel, route_llama_logs,
)
opts = json.loads(sys.argv[1])
route_llama_logs(False)
model = NativeModel(ModelOptions(opts["path"], repack="off"))
NativeContext(model, ContextOptions(**opts["context"]))
print("llamacpp_probe: loaded", file=sys.stderr, flush=True)
"""


def measure_slots_load(
    path: str | Path,
    *,
    n_ctx_seq: int,
    n_seq: int,
    kv_type: str = "f16",
    flash_attn: bool = False,
    timeout: float = 120,
) -> tuple[LoadBuffers, str]:
    """Load `path` as llmup's slot worker does (one context, `n_seq` sequences of
    `n_ctx_seq` tokens, repacking off) in a subprocess; (parsed buffers, load log)."""
    context = {"n_ctx_seq": n_ctx_seq, "n_seq": n_seq, "kv_type": kv_type,
               "flash_attn": flash_attn}  # fmt: skip
    options = json.dumps({"path": str(path), "context": context})
    log = _load_in_child(_SLOTS_CHILD, options, timeout, "slot worker load")
    return parse_load_log(log), log


def resident_bytes(log: str, when: str) -> int:
    """From a `run_load` log, the child's resident set (bytes): `when` is "peak" (/proc's
    VmHWM, at the end) or "before_load" (VmRSS after the imports, before the model)."""
    match = re.search(rf"llamacpp_probe: {when}_rss_kib (\d+)", log)
    if match is None:
        raise ValueError(f"the load log has no {when} RSS line")
    return int(match.group(1)) * 1024


def measure_load(path: str | Path, **load: Any) -> tuple[LoadBuffers, str]:
    """Load `path` in a subprocess (`run_load`'s options) and return (parsed buffer sizes,
    raw load log)."""
    log = run_load(path, **load)
    return parse_load_log(log), log
