"""What is installed to use the GPUs: llama-cpp-python's build, exllamav2 and torch."""

from __future__ import annotations

import json
import os
import sys

import llama_cpp
import pytest

from launcher.hardware import installed
from launcher.hardware.installed import (
    LLAMA_CPP_PROBE,
    detect_backends,
    detect_llama_cpp,
    install_key,
    parse_llama_cpp_probe,
    torch_cuda_version,
)

# What the probe prints for a CUDA build: the libraries llama-cpp-python installs with
# CMAKE_ARGS="-DGGML_CUDA=on", and llama_print_system_info's "<backend> : FEATURE = v |"
# lines (ggml-cuda.cu's ggml_backend_cuda_get_features lists ARCHS, USE_GRAPHS, ...).
CUDA_BUILD = {
    "version": "0.3.36",
    "gpu_offload": True,
    "rpc": False,
    "system_info": "CUDA : ARCHS = 860 | USE_GRAPHS = 1 | PEER_MAX_BATCH_SIZE = 128 | "
    "CPU : SSE3 = 1 | AVX2 = 1 | ",
    "libs": ["libggml-base.so", "libggml-cpu.so", "libggml-cuda.so", "libllama.so"],
}


def test_this_machine_has_a_cpu_only_llama_cpp():
    """The build installed here cannot offload: what llama.cpp itself answers."""
    found = detect_backends()
    lc = found.llama_cpp
    assert lc.installed and lc.version == llama_cpp.__version__
    assert lc.gpu_offload is llama_cpp.llama_supports_gpu_offload() is False
    assert lc.gpu_backends == [] and lc.error is None
    assert found.exllamav2.installed is False  # the optional extra is not installed here


def test_probe_output_of_a_cuda_build():
    lc = parse_llama_cpp_probe(json.dumps(CUDA_BUILD) + "\n")
    assert (lc.installed, lc.gpu_offload, lc.gpu_backends, lc.rpc) == (True, True, ["cuda"], False)


def test_probe_names_metal_vulkan_and_rpc():
    out = {
        **CUDA_BUILD,
        "system_info": "Metal : EMBED_LIBRARY = 1 | CPU : NEON = 1 | ",
        "libs": ["libggml-metal.dylib", "libggml-vulkan.dylib", "libggml-rpc.dylib"],
    }
    lc = parse_llama_cpp_probe(json.dumps(out))
    assert lc.gpu_backends == ["metal", "vulkan"] and lc.rpc


def test_probe_reports_a_broken_install():
    lc = parse_llama_cpp_probe('{"error": "OSError: libcudart.so.12: cannot open shared object"}')
    assert lc.installed and not lc.gpu_offload and "libcudart" in lc.error


def test_probe_runs_in_a_child_python(monkeypatch):
    """The probe never loads llama.cpp (and a CUDA context) into the llmup process."""
    seen = []

    def run(cmd):
        seen.append(cmd)
        return json.dumps(CUDA_BUILD)

    monkeypatch.delitem(sys.modules, "llama_cpp", raising=False)
    found = detect_backends(run)
    assert seen == [[sys.executable, "-c", LLAMA_CPP_PROBE]]
    assert found.llama_cpp.gpu_backends == ["cuda"]
    assert "llama_cpp" not in sys.modules


def test_the_probe_is_cached_in_the_home_per_install(tmp_path, monkeypatch):
    """detect/plan/serve pay the child Python once per install, not on every run."""
    calls = []

    def probe(cmd):
        calls.append(cmd)
        return json.dumps(CUDA_BUILD)

    monkeypatch.setattr(installed, "run_command", probe)
    first = detect_llama_cpp(home=tmp_path)
    assert detect_llama_cpp(home=tmp_path) == first and first.gpu_backends == ["cuda"]
    assert len(calls) == 1
    monkeypatch.setattr(installed, "install_key", lambda package: "reinstalled")
    assert detect_llama_cpp(home=tmp_path) == first and len(calls) == 2
    detect_llama_cpp()  # no home: probed every time
    assert len(calls) == 3


def test_a_rebuilt_install_has_another_key(tmp_path):
    package = tmp_path / "llama_cpp"
    (package / "lib").mkdir(parents=True)
    lib = package / "lib" / "libllama.so"
    lib.write_bytes(b"old")
    before = install_key(package)
    stat = lib.stat()
    os.utime(lib, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert install_key(package) != before


def test_a_failed_probe_is_not_cached(tmp_path, monkeypatch):
    answers = iter(['{"error": "OSError: libcudart.so.12"}', json.dumps(CUDA_BUILD)])
    monkeypatch.setattr(installed, "run_command", lambda cmd: next(answers))
    assert detect_llama_cpp(home=tmp_path).error
    assert detect_llama_cpp(home=tmp_path).gpu_backends == ["cuda"]


@pytest.mark.parametrize(
    ("line", "expected"),
    [("cuda: Optional[str] = '12.1'\n", "12.1"), ("cuda: Optional[str] = None\n", None)],
)
def test_torch_cuda_is_read_from_its_version_file(tmp_path, monkeypatch, line, expected):
    pkg = tmp_path / "torch"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise ImportError('torch must not be imported')\n")
    (pkg / "version.py").write_text(f"__version__ = '2.3.0'\n{line}")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert torch_cuda_version() == expected
