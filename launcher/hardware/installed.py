"""What is installed to use the hardware: llama-cpp-python's build and exllamav2/torch.

`pip install llama-cpp-python` builds llama.cpp for the CPU unless CMAKE_ARGS asks for CUDA
or Metal, and a CPU build silently runs "offloaded" layers on the CPU. So detection asks
llama.cpp itself (llama_supports_gpu_offload) and lists the accelerator libraries the
package ships. That runs in a child Python: loading a CUDA build creates a CUDA context on
every GPU, which must not stay in the long-lived llmup process, and a broken build must
not crash detection. The child costs a few hundred milliseconds on every `detect`, `plan`
and `serve`, so its answer is cached in the home per install (interpreter, package folder,
version and the newest file time of its libraries: a reinstall or rebuild probes again).
exllamav2 and torch are looked up without importing them (torch's import takes seconds);
torch's own version.py says which CUDA it was built for.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

from pydantic import ValidationError

from launcher.hardware.runner import Runner, run_command
from launcher.hardware.snapshot import ExllamaInstall, InstalledBackends, LlamaCppInstall
from launcher.jsonfile import read_json, write_json_atomic

log = logging.getLogger(__name__)

# Runs in a child interpreter; prints one JSON object.
LLAMA_CPP_PROBE = """
import json, os, sys
try:
    import llama_cpp
except Exception as exc:
    print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
    sys.exit(0)
lib = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
print(json.dumps({
    "version": getattr(llama_cpp, "__version__", None),
    "gpu_offload": bool(llama_cpp.llama_supports_gpu_offload()),
    "rpc": bool(llama_cpp.llama_supports_rpc()),
    "system_info": llama_cpp.llama_print_system_info().decode(errors="replace"),
    "libs": sorted(os.listdir(lib)) if os.path.isdir(lib) else [],
}))
"""
# ggml's accelerator libraries (libggml-cuda.so, ggml-cuda.dll, libggml-metal.dylib...)
_LIB = re.compile(r"^(?:lib)?ggml-(cuda|metal|vulkan|hip|sycl|opencl|musa|cann|rpc)\b", re.I)
# names llama_print_system_info gives the backends that list features
_INFO = {"CUDA": "cuda", "ROCm": "hip", "MUSA": "musa", "Metal": "metal", "Vulkan": "vulkan"}
_TORCH_CUDA = re.compile(r"^cuda\b[^=]*=\s*['\"]([^'\"]+)['\"]", re.M)
CACHE_FILE = "llama-cpp-install.json"


def detect_backends(run: Runner | None = None, *, home: Path | None = None) -> InstalledBackends:
    """`home` caches the llama-cpp-python probe (None: probe every time); a replayed `run`
    is never cached."""
    return InstalledBackends(
        llama_cpp=detect_llama_cpp(run, home=home), exllamav2=detect_exllamav2()
    )


def detect_llama_cpp(run: Runner | None = None, *, home: Path | None = None) -> LlamaCppInstall:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        return LlamaCppInstall(installed=False)
    cache = Path(home) / CACHE_FILE if home is not None and run is None else None
    key = install_key(Path(spec.origin).parent)
    cached = _cached(cache, key)
    if cached is not None:
        return cached
    try:
        out = (run or run_command)([sys.executable, "-c", LLAMA_CPP_PROBE])
        found = parse_llama_cpp_probe(out)
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        log.warning("could not probe llama-cpp-python: %s", exc)
        return LlamaCppInstall(installed=True, error=f"probe failed: {exc}")
    if cache is not None and found.error is None:
        try:
            write_json_atomic(cache, {"key": key, "install": found.model_dump()})
        except OSError as exc:  # a cache is never worth failing detection
            log.warning("could not cache the llama-cpp-python probe: %s", exc)
    return found


def install_key(package: Path) -> str:
    """What identifies one install of llama-cpp-python: a reinstall or rebuild changes it."""
    files = [package, *package.glob("lib/*"), *package.glob("*.py")]
    newest = max((f.stat().st_mtime_ns for f in files if f.exists()), default=0)
    interpreter = os.path.realpath(sys.executable)
    return f"{interpreter}|{package}|{_version('llama_cpp_python')}|{newest}"


def _cached(cache: Path | None, key: str) -> LlamaCppInstall | None:
    data = read_json(cache) if cache is not None else None
    if not isinstance(data, dict) or data.get("key") != key:
        return None
    try:
        return LlamaCppInstall.model_validate(data.get("install"))
    except ValidationError as exc:
        log.warning("probing llama-cpp-python again: the cached answer is malformed (%s)", exc)
        return None


def parse_llama_cpp_probe(text: str) -> LlamaCppInstall:
    """The probe's JSON line as a LlamaCppInstall (ValueError when it is not JSON)."""
    data = json.loads(text.strip().splitlines()[-1])
    if "error" in data:
        return LlamaCppInstall(installed=True, error=data["error"])
    backends = {m[1].lower() for lib in data.get("libs", []) if (m := _LIB.match(lib))}
    info = data.get("system_info", "")
    backends |= {name for key, name in _INFO.items() if f"{key} :" in info}
    rpc = bool(data.get("rpc")) or "rpc" in backends
    return LlamaCppInstall(
        installed=True,
        version=data.get("version"),
        gpu_offload=bool(data.get("gpu_offload")),
        gpu_backends=sorted(backends - {"rpc"}),
        rpc=rpc,
    )


def detect_exllamav2() -> ExllamaInstall:
    return ExllamaInstall(
        installed=importlib.util.find_spec("exllamav2") is not None,
        version=_version("exllamav2"),
        torch=_version("torch"),
        torch_cuda=torch_cuda_version(),
    )


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def torch_cuda_version() -> str | None:
    """The CUDA version torch was built for (torch/version.py), without importing torch."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "version.py"
        if path.is_file():
            m = _TORCH_CUDA.search(path.read_text(errors="replace"))
            return m[1] if m else None
    return None
