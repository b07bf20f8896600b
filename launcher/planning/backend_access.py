"""Which devices each backend may use, from what is installed (the snapshot's `backends`).

Planning for this machine uses only what is installed: a CPU build of llama-cpp-python
never gets a layer on a GPU (llama.cpp would silently run it on the CPU), and exllamav2 is
a candidate only with a CUDA build of torch. A snapshot of another machine carries no
`backends`; the plan then assumes the GPU builds and says so.
"""

from __future__ import annotations

from dataclasses import dataclass

from launcher.hardware.snapshot import HardwareSnapshot, InstalledBackends

INSTALL_LLAMA_CPP = (
    'CMAKE_ARGS="-DGGML_{flag}=on" pip install --force-reinstall --no-cache-dir llama-cpp-python'
)
CUDA_IMAGE_HINT = (
    ", or run the backend in llmup's CUDA image: `llmup serve --runtime docker` "
    "(build it with `docker build -f docker/Dockerfile.cuda -t llmup:cuda .`)"
)
GPU_BUILDS = {"cuda": {"cuda", "vulkan"}, "metal": {"metal", "vulkan"}}  # device kind -> builds
BUILD_FLAG = {"cuda": "CUDA", "metal": "METAL"}
ASSUMED = (
    "planned for another machine: its snapshot has no `backends`, so llama-cpp-python is "
    "assumed built with GPU offload and exllamav2 with a CUDA torch (record them with "
    "`llmup detect --json` there)"
)


@dataclass(frozen=True)
class BackendAccess:
    llamacpp_kinds: frozenset[str]  # GPU kinds llama.cpp may offload to
    exllamav2_why_not: str | None  # None: exllamav2 is usable
    notes: tuple[str, ...] = ()


def backend_access(snapshot: HardwareSnapshot) -> BackendAccess:
    kinds = {"cuda" if g.vendor == "nvidia" else "metal" for g in snapshot.gpus}
    if snapshot.backends is None:
        return BackendAccess(frozenset(kinds), None, (ASSUMED,) if kinds else ())
    installed = snapshot.backends
    usable = {k for k in kinds if _llamacpp_can_use(installed, k)}
    notes = [f"planned for the backends installed in {installed.where}"] if installed.where else []
    notes += [_cpu_only_note(installed, k) for k in sorted(kinds - usable)]
    why_not = _exllamav2_why_not(installed)
    if why_not and "cuda" in kinds:
        notes.append(f"GPTQ candidates skipped: {why_not}")
    return BackendAccess(frozenset(usable), why_not, tuple(notes))


def _llamacpp_can_use(installed: InstalledBackends, kind: str) -> bool:
    lc = installed.llama_cpp
    return lc.gpu_offload and bool(GPU_BUILDS[kind] & set(lc.gpu_backends))


def _cpu_only_note(installed: InstalledBackends, kind: str) -> str:
    lc = installed.llama_cpp
    device = "NVIDIA GPU" if kind == "cuda" else "Apple GPU"
    if installed.where:
        return (
            f"the backend runs in {installed.where}, whose llama.cpp cannot use the {device} "
            "from a container; llama.cpp layers planned on the CPU"
        )
    if lc.error:
        return f"llama-cpp-python does not load ({lc.error}); the {device} is not used"
    if GPU_BUILDS[kind] & set(lc.gpu_backends):
        return (
            f"llama-cpp-python is built for the {device} but sees none: check the driver "
            "(`nvidia-smi`) and CUDA_VISIBLE_DEVICES; llama.cpp layers planned on the CPU"
        )
    return (
        f"the installed llama-cpp-python {lc.version or ''} is a CPU build, so llama.cpp "
        f"layers are planned on the CPU; to use the {device}: "
        + INSTALL_LLAMA_CPP.format(flag=BUILD_FLAG[kind])
        + (CUDA_IMAGE_HINT if kind == "cuda" else "")
    )


def _exllamav2_why_not(installed: InstalledBackends) -> str | None:
    ex = installed.exllamav2
    if not ex.installed:
        return "exllamav2 is not installed (pip install 'llmup[exllamav2]')"
    if ex.torch_cuda is None:
        return f"torch {ex.torch or ''} has no CUDA, which exllamav2 needs"
    return None
