"""What llmup's container images have installed, for planning a backend that runs in one.

With `llmup serve --runtime docker` (or LLMUP_RUNTIME=docker) the backend runs in llmup's
image, not in this Python: what this machine's llama-cpp-python was built with no longer
decides whether layers go to a GPU. The CUDA image (`docker/Dockerfile.cuda`) compiles
llama.cpp with CUDA and exllamav2 against a CUDA build of PyTorch; the CPU image compiles
llama.cpp for the CPU; a Linux container cannot reach Apple's GPU, so on a Mac the plan is
for the CPU. The versions are the Dockerfile's build arguments (a test keeps them in step).
"""

from __future__ import annotations

from launcher.hardware.snapshot import (
    ExllamaInstall,
    HardwareSnapshot,
    InstalledBackends,
    LlamaCppInstall,
)

TORCH_VERSION = "2.6.0"
TORCH_CUDA = "12.4"  # of CUDA_VERSION 12.4.1
EXLLAMAV2_VERSION = "0.3.2"


def cuda_image_backends(image: str) -> InstalledBackends:
    return InstalledBackends(
        llama_cpp=LlamaCppInstall(installed=True, gpu_offload=True, gpu_backends=["cuda"]),
        exllamav2=ExllamaInstall(
            installed=True, version=EXLLAMAV2_VERSION, torch=TORCH_VERSION, torch_cuda=TORCH_CUDA
        ),
        where=f"the {image} image",
    )


def cpu_image_backends(image: str) -> InstalledBackends:
    return InstalledBackends(llama_cpp=LlamaCppInstall(installed=True), where=f"the {image} image")


def in_image(snapshot: HardwareSnapshot, cpu_image: str, cuda_image: str) -> HardwareSnapshot:
    """The snapshot with the backends of the image a container backend would run in: the
    CUDA image where there are NVIDIA GPUs, else the CPU image."""
    if snapshot.nvidia_gpus:
        backends = cuda_image_backends(cuda_image)
    else:
        backends = cpu_image_backends(cpu_image)
    return snapshot.model_copy(update={"backends": backends})
