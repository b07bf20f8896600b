"""llama.cpp memory model: what each device will hold for a given placement.

Figures follow llama.cpp's own allocation code paths (https://github.com/ggml-org/llama.cpp:
src/llama-kv-cache.cpp for the KV cache and its padding, src/llama-context.cpp for the
compute and output buffers, src/llama-model.cpp for which device holds each layer) and are
checked against the buffer sizes llama.cpp logs when it loads a model
(tests/calibration/test_calibration.py). Units are bytes until the plan rounds to MiB.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from launcher.catalog.shape import ModelShape
from launcher.planning.memory import DeviceMemory
from launcher.units import MIB

# bytes per element of each KV cache type (block size / block bytes)
KV_TYPE_BYTES = {
    "f32": 4.0,
    "f16": 2.0,
    "bf16": 2.0,
    "q8_0": 34 / 32,
    "q4_0": 18 / 32,
    "q4_1": 20 / 32,
    "q5_0": 22 / 32,
    "q5_1": 24 / 32,
}

# Runtime context a backend holds on each device before any buffer (Ollama budgets the same).
DEVICE_OVERHEAD = {"cuda": 457 * MIB, "metal": 512 * MIB, "cpu": 0}
# The serving process itself: Python, llama-cpp-python, uvicorn (measured RSS before load).
HOST_PROCESS = 160 * MIB
KV_PAD = 256
# GGML_SCHED_MAX_COPIES, ggml/src/ggml-backend.cpp: input copies under pipeline parallelism
N_COPIES = 4


@dataclass(frozen=True)
class LlamaCppSettings:
    n_ctx: int
    n_batch: int = 512
    n_ubatch: int = 512
    type_k: str = "f16"
    type_v: str = "f16"
    flash_attn: bool = False
    n_seq_max: int = 1

    @property
    def kv_size(self) -> int:
        """Cells in the KV cache, every sequence's: n_ctx (per sequence) x n_seq_max, padded
        up to a multiple of 256 as llama.cpp pads its context. Without a unified KV cache
        llama.cpp gives each sequence its own stream of kv_size / n_seq_max cells (measured:
        Gemma 3 270M at 1024 tokens holds 15, 30, 60 MiB of KV for 1, 2, 4 sequences)."""
        return -(-(self.n_ctx * self.n_seq_max) // KV_PAD) * KV_PAD

    @property
    def kv_size_seq(self) -> int:
        """Cells one sequence attends over: what the compute graph is sized for."""
        return self.kv_size // self.n_seq_max


def kv_bytes_per_layer(shape: ModelShape, settings: LlamaCppSettings) -> int:
    """K and V rows of one layer for every cell of the cache."""
    n_embd_kv = shape.arch.n_head_kv * shape.arch.head_dim
    per_elem = KV_TYPE_BYTES[settings.type_k] + KV_TYPE_BYTES[settings.type_v]
    return int(settings.kv_size * n_embd_kv * per_elem)


def kv_cache_bytes(shape: ModelShape, settings: LlamaCppSettings) -> int:
    return kv_bytes_per_layer(shape, settings) * shape.arch.n_layer


def compute_bytes(shape: ModelShape, settings: LlamaCppSettings) -> int:
    """The worst-case graph buffer llama.cpp reserves (full KV, n_ubatch tokens).

    The KQ mask (C x u, f32; f16 with flash attention) lives through the whole graph.
    Without flash attention the peak is the attention scores (C x u x n_head, f32)
    beside five activation rows and K/V, the FFN (three n_ff rows beside five of width
    E) or the logits (n_vocab beside three rows of width E), whichever is largest.
    Fitted to the "compute buffer size" llama.cpp logs (tests/calibration/test_calibration.py); it
    is within 8% of the 296 MiB the reference logged for 7B at 4096/512, erring high.

    Flash attention never materialises the scores; its peak depends on how the graph
    allocator packs the FFN tensors, so the figure is an upper envelope (within ~10%);
    so is the figure for contexts shorter than one ubatch.
    """
    arch = shape.arch
    u = min(settings.n_ubatch, settings.n_batch, settings.n_ctx)
    c = settings.kv_size_seq  # one stream per sequence: the graph does not grow with them
    e, ff, e_kv = arch.n_embd, arch.n_ff, arch.n_head_kv * arch.head_dim
    logits = arch.n_vocab + 3 * e + 1
    if settings.flash_attn:
        return 4 * u * max(c // 2 + 3 * ff + 4 * e + 64, logits)
    attention = c * arch.n_head + c + 5 * e + 2 * e_kv + 5
    ffn = c + 3 * ff + 5 * e + 5
    peak = max(attention, ffn, logits)
    if settings.n_ctx < settings.n_ubatch:  # tiny contexts pack worse: an envelope
        peak = max(peak, 3 * ff + 6 * e + 2 * c)
    return 4 * u * peak


def output_bytes(shape: ModelShape, settings: LlamaCppSettings) -> int:
    """llama.cpp's logits buffer: one n_vocab row of f32 per sequence.

    llama-cpp-python also allocates an n_batch x n_vocab scores array, but never writes
    it unless logits_all is set, so those pages are never resident.
    """
    return shape.arch.n_vocab * settings.n_seq_max * 4


def layer_devices(n_layer: int, n_gpu_layers: int, tensor_split: list[float]) -> list[int]:
    """Device index of each block and (last entry) of the output layer; -1 is the CPU.

    The same arithmetic as llama.cpp's llama_model::load_tensors: the last n_gpu_layers
    blocks go to the GPUs, the output layer only when n_gpu_layers > n_layer, and
    tensor_split's cumulative fractions choose each offloaded layer's device.
    """
    if n_gpu_layers < 0:
        n_gpu_layers = n_layer + 1
    if not tensor_split:
        return [-1] * (n_layer + 1)
    start = max(n_layer - n_gpu_layers, 0)
    act = min(n_gpu_layers, n_layer + 1)
    total = float(sum(tensor_split))
    cumulative, acc = [], 0.0
    for share in tensor_split:
        acc += share
        cumulative.append(acc / total)
    devices = []
    for il in range(n_layer + 1):
        if il < start or il - start >= act:
            devices.append(-1)
        else:
            idx = bisect.bisect_right(cumulative, (il - start) / act)
            devices.append(min(idx, len(tensor_split) - 1))
    return devices


def memory_by_device(
    shape: ModelShape,
    settings: LlamaCppSettings,
    *,
    gpus: list[str],
    n_gpu_layers: int,
    tensor_split: list[float],
) -> tuple[list[DeviceMemory], DeviceMemory]:
    """Per-GPU needs (for the physical devices `gpus`, e.g. ["cuda:1", "cuda:0"], in the
    order llama.cpp will see them) and the host's need."""
    placement = layer_devices(shape.arch.n_layer, n_gpu_layers, tensor_split if gpus else [])
    devices = [DeviceMemory(device=name) for name in gpus]
    host = DeviceMemory(device="cpu", weights=shape.layout.token_embd, overhead=HOST_PROCESS)
    kv_layer = kv_bytes_per_layer(shape, settings)
    for il, dev in enumerate(placement[:-1]):
        target = host if dev < 0 else devices[dev]
        target.weights += shape.layout.layers[il]
        target.kv_cache += kv_layer
        target.layers += 1
    out_dev = placement[-1]
    (host if out_dev < 0 else devices[out_dev]).weights += shape.layout.output
    compute = compute_bytes(shape, settings)
    if pipeline_parallel(len(devices), n_gpu_layers, shape.arch.n_layer):
        compute += pipeline_copies_bytes(shape, settings)
    for gpu in devices:
        gpu.overhead = DEVICE_OVERHEAD[gpu.device.partition(":")[0]]
        gpu.compute = compute if gpu.layers else 0
    host.compute = compute if host.layers or not devices else _host_compute(shape, settings)
    host.extra["output"] = output_bytes(shape, settings)
    return devices, host


def pipeline_parallel(n_devices: int, n_gpu_layers: int, n_layer: int) -> bool:
    """llama.cpp pipelines the layer split when the model spans several GPUs with every layer
    (and the output) offloaded: llama_context's constructor, src/llama-context.cpp."""
    return n_devices > 1 and (n_gpu_layers < 0 or n_gpu_layers > n_layer)


def pipeline_copies_bytes(shape: ModelShape, settings: LlamaCppSettings) -> int:
    """Extra compute-buffer bytes per GPU when llama.cpp pipelines a multi-GPU split.

    Pipeline parallelism makes the scheduler keep N_COPIES = GGML_SCHED_MAX_COPIES (4, a
    build option) copies of every input of each device's graph, so the host can upload the
    next micro-batch while the GPUs still read the last one; the copies are flagged input
    and output, so the graph allocator never reuses their memory (ggml-backend.cpp,
    ggml_backend_sched_split_graph). A device's inputs are the KQ mask (kv_size x n_ubatch,
    f32, f16 with flash attention) and the activations arriving from the previous device
    (n_ubatch x n_embd, f32); the single copy of them is already in compute_bytes.
    """
    u = min(settings.n_ubatch, settings.n_batch, settings.n_ctx)
    mask = settings.kv_size_seq * u * (2 if settings.flash_attn else 4)
    activations = u * shape.arch.n_embd * 4
    return (N_COPIES - 1) * (mask + activations)


def _host_compute(shape: ModelShape, settings: LlamaCppSettings) -> int:
    """With every block offloaded the host graph holds only the input embeddings."""
    u = min(settings.n_ubatch, settings.n_ctx)
    return 4 * u * shape.arch.n_embd
