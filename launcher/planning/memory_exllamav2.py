"""exllamav2 memory model (GPTQ on NVIDIA): weights, cache, scratch, reserves per device.

Figures follow exllamav2's allocation code (https://github.com/turboderp-org/exllamav2:
exllamav2/model.py for the autosplit reserves and scratch, exllamav2/cache.py for the
cache, exllamav2/attn.py for the attention temp buffer): the input
embedding stays in system RAM, lm_head is fp16 on the last device, every device that
holds layers needs the largest module's scratch and the attention temp buffer.
"""

from __future__ import annotations

from dataclasses import dataclass

from launcher.catalog.models import Architecture, GptqVariant
from launcher.planning.memory import DeviceMemory
from launcher.units import MIB

_CACHE_BITS = {"Q8": 8, "Q6": 6, "Q4": 4}
TORCH_CONTEXT = 400 * MIB
FIRST_DEVICE_RESERVE = 192 * MIB
OTHER_DEVICE_RESERVE = 64 * MIB
MAX_INPUT_LEN = 2048
MAX_ATTENTION_SIZE = 2048 * 2048


@dataclass(frozen=True)
class ExllamaSettings:
    max_seq_len: int
    cache_mode: str = "FP16"
    flash_attn: bool = False


def cache_bytes_per_token_layer(arch: Architecture, cache_mode: str) -> int:
    """K and V of one token in one layer; quantized modes carry one fp16 scale per 32 values."""
    if cache_mode == "FP16":
        return 2 * arch.n_embd_kv * 2
    bits = _CACHE_BITS[cache_mode]
    return int(2 * arch.n_embd_kv * (bits / 8 + 1 / 16))


def quant_temp_bytes(arch: Architecture, settings: ExllamaSettings) -> int:
    """Quantized caches dequantize into one fp16 K/V pair per device."""
    if settings.cache_mode == "FP16":
        return 0
    return 2 * settings.max_seq_len * arch.n_embd_kv * 2


def scratch_bytes(arch: Architecture) -> int:
    """Largest module scratch: the MLP (dequantized weight + activations) or the fp16 lm_head."""
    mlp = (
        arch.n_embd * arch.n_ff * 2
        + 2 * MAX_INPUT_LEN * arch.n_ff * 2
        + MAX_INPUT_LEN * arch.n_embd * 2
    )
    return max(mlp, arch.n_vocab * arch.n_embd * 2)


def attention_temp_bytes(arch: Architecture, settings: ExllamaSettings) -> int:
    size = 2 * min(MAX_ATTENTION_SIZE, settings.max_seq_len**2) * arch.n_head * 2
    return size // 10 if settings.flash_attn else size


def layer_weight_bytes(arch: Architecture, variant: GptqVariant, embedding_bytes: int) -> int:
    """File bytes of one decoder layer: the file minus the fp16 embedding and lm_head."""
    return (variant.bytes - 2 * embedding_bytes) // arch.n_layer


def memory_by_device(
    arch: Architecture,
    variant: GptqVariant,
    embedding_bytes: int,
    settings: ExllamaSettings,
    layer_counts: list[int],
    devices: list[str] | None = None,
) -> tuple[list[DeviceMemory], DeviceMemory]:
    """Per-GPU needs for `layer_counts[i]` consecutive layers on `devices[i]` (the physical
    GPUs, in the order exllamav2 will see them; cuda:0, cuda:1... by default), and the host's."""
    devices = devices or [f"cuda:{i}" for i in range(len(layer_counts))]
    per_layer = layer_weight_bytes(arch, variant, embedding_bytes)
    cache_layer = cache_bytes_per_token_layer(arch, settings.cache_mode) * settings.max_seq_len
    gpus = []
    for i, (name, count) in enumerate(zip(devices, layer_counts)):
        dev = DeviceMemory(device=name, layers=count)
        dev.weights = per_layer * count
        dev.kv_cache = cache_layer * count
        reserve = FIRST_DEVICE_RESERVE if i == 0 else OTHER_DEVICE_RESERVE
        dev.overhead = TORCH_CONTEXT + reserve
        if count:
            dev.compute = scratch_bytes(arch) + attention_temp_bytes(arch, settings)
            dev.kv_cache += quant_temp_bytes(arch, settings)
        gpus.append(dev)
    last = max((i for i, c in enumerate(layer_counts) if c), default=len(layer_counts) - 1)
    gpus[last].weights += embedding_bytes  # lm_head, fp16
    host = DeviceMemory(device="cpu", weights=embedding_bytes, overhead=1024 * MIB)
    return gpus, host
