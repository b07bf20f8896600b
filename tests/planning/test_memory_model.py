"""The memory models against the sourced figures of the reference (section 4 and 5)."""

from __future__ import annotations

import pytest

from launcher.catalog.loader import load_catalog
from launcher.catalog.models import Architecture
from launcher.catalog.shape import ModelShape, WeightLayout, layout_from_catalog
from launcher.planning import memory_exllamav2 as exl
from launcher.planning.memory_llamacpp import (
    MIB,
    LlamaCppSettings,
    compute_bytes,
    kv_cache_bytes,
    layer_devices,
    memory_by_device,
)
from launcher.planning.placement import split_units

CAT = load_catalog()


def shape(size: str) -> ModelShape:
    spec = CAT.get(size)
    variant = next(v for v in spec.gguf.variants if v.quant == "Q4_K_M")
    return ModelShape(
        spec.architecture, layout_from_catalog(spec.architecture, variant, CAT.quant("Q4_K_M"))
    )


@pytest.mark.parametrize(
    ("size", "mib_per_token"), [("7b", 0.5), ("13b", 0.78125), ("70b", 0.3125)]
)
def test_kv_cache_per_token_f16(size, mib_per_token):
    kv = kv_cache_bytes(shape(size), LlamaCppSettings(n_ctx=4096))
    assert kv == 4096 * mib_per_token * MIB


def test_kv_7b_at_4096_is_2048_mib():
    assert kv_cache_bytes(shape("7b"), LlamaCppSettings(n_ctx=4096)) == 2048 * MIB


def test_kv_size_is_padded_to_256():
    s = shape("7b")
    assert kv_cache_bytes(s, LlamaCppSettings(n_ctx=1000)) == kv_cache_bytes(
        s, LlamaCppSettings(n_ctx=1024)
    )
    assert LlamaCppSettings(n_ctx=1025).kv_size == 1280


@pytest.mark.parametrize(("kv_type", "ratio"), [("q8_0", 34 / 64), ("q4_0", 18 / 64)])
def test_quantized_kv_types(kv_type, ratio):
    s = shape("7b")
    f16 = kv_cache_bytes(s, LlamaCppSettings(n_ctx=4096))
    q = kv_cache_bytes(s, LlamaCppSettings(n_ctx=4096, type_k=kv_type, type_v=kv_type))
    assert q == pytest.approx(f16 * ratio)


def test_compute_buffer_7b_4096_near_logged_296_mib_erring_high():
    """The reference logged 296.01 MiB (older build, CUDA); the CPU fit of this build
    holds three more activation rows per token: 320 MiB, never less than the log."""
    c = compute_bytes(shape("7b"), LlamaCppSettings(n_ctx=4096, n_ubatch=512)) / MIB
    assert 296.01 <= c <= 296.01 * 1.09
    assert c == pytest.approx(4 * 512 * (5 + 5 * 4096 + 2 * 4096 + 4096 * 33) / MIB)


def test_compute_buffer_logits_term_dominates_small_models_with_large_vocab():
    """Measured here: E 512, n_ff 1024, vocab 32000, u 300 logs 38.3801 MiB."""
    arch = Architecture(
        n_layer=4,
        n_embd=512,
        n_ff=1024,
        n_head=8,
        n_head_kv=8,
        head_dim=64,
        n_vocab=32000,
        n_ctx_train=4096,
    )
    tiny = ModelShape(arch, WeightLayout(token_embd=0, output=0, layers=(0,) * 4, file_bytes=0))
    c = compute_bytes(tiny, LlamaCppSettings(n_ctx=300, n_batch=300, n_ubatch=300))
    assert c / MIB == pytest.approx(38.3801, abs=0.001)


def test_catalog_gguf_sizes():
    spec = CAT.get("7b")
    q4km = next(v for v in spec.gguf.variants if v.quant == "Q4_K_M")
    assert q4km.bytes == 4_081_004_224
    q8 = next(v for v in CAT.get("70b").gguf.variants if v.quant == "Q8_0")
    assert q8.bytes == 73_290_000_000
    assert q8.parts == ["llama-2-70b-chat.Q8_0.gguf-split-a", "llama-2-70b-chat.Q8_0.gguf-split-b"]
    assert all(len(m.gguf.variants) == 12 for m in CAT.models)


def test_catalog_layout_sums_to_file_size():
    spec = CAT.get("13b")
    for v in spec.gguf.variants:
        layout = layout_from_catalog(spec.architecture, v, CAT.quant(v.quant))
        assert 0 <= v.bytes - layout.tensor_bytes < spec.architecture.n_layer
        assert layout.token_embd < layout.layers[0] * 2


@pytest.mark.parametrize(
    ("size", "branch", "bpw"),
    [
        ("7b", "main", 4.63),
        ("13b", "gptq-4bit-32g-actorder_True", 4.92),
        ("70b", "main", 4.10),
    ],
)
def test_gptq_bits_per_weight(size, branch, bpw):
    spec = CAT.get(size)
    v = next(v for v in spec.gptq.variants if v.branch == branch)
    assert v.bytes * 8 / spec.params == pytest.approx(bpw, abs=0.01)


def test_gptq_group_size_raises_bits_per_weight():
    """Smaller groups carry more scales: g32 > g64 > g128 for the same model."""
    spec = CAT.get("70b")
    sizes = {v.group_size: v.bytes for v in spec.gptq.variants if v.bits == 4}
    assert sizes[32] > sizes[64] > sizes[128] > sizes[None]


@pytest.mark.parametrize(
    ("mode", "per_token"), [("FP16", 16384), ("Q8", 8704), ("Q6", 6656), ("Q4", 4608)]
)
def test_exllamav2_cache_bytes_7b(mode, per_token):
    assert exl.cache_bytes_per_token_layer(CAT.get("7b").architecture, mode) == per_token


@pytest.mark.parametrize(("size", "fp16", "q4"), [("13b", 20480, 5760), ("70b", 4096, 1152)])
def test_exllamav2_cache_bytes_other_sizes(size, fp16, q4):
    arch = CAT.get(size).architecture
    assert exl.cache_bytes_per_token_layer(arch, "FP16") == fp16
    assert exl.cache_bytes_per_token_layer(arch, "Q4") == q4


def test_exllamav2_scratch_and_attention():
    a70, a7 = CAT.get("70b").architecture, CAT.get("7b").architecture
    assert exl.scratch_bytes(a70) == 704 * MIB
    assert 245 * MIB < exl.scratch_bytes(a7) < 255 * MIB
    settings = exl.ExllamaSettings(max_seq_len=4096)
    assert exl.attention_temp_bytes(a70, settings) == 1024 * MIB
    assert exl.attention_temp_bytes(a7, settings) == 512 * MIB


def test_exllamav2_70b_main_total_is_35_to_36_gib():
    spec = CAT.get("70b")
    variant = next(v for v in spec.gptq.variants if v.branch == "main")
    gpus, host = exl.memory_by_device(
        spec.architecture, variant, spec.gptq.embedding_bytes, exl.ExllamaSettings(4096), [80]
    )
    assert 35 * 1024 * MIB < gpus[0].total < 36 * 1024 * MIB
    assert host.weights == spec.gptq.embedding_bytes  # embedding stays in RAM


def test_layer_devices_matches_llama_cpp_rules():
    # partial: the last k blocks go to the GPU, the output layer stays on the CPU
    assert layer_devices(4, 2, [1.0]) == [-1, -1, 0, 0, -1]
    # n_gpu_layers > n_layer also offloads the output layer
    assert layer_devices(4, 5, [1.0]) == [0, 0, 0, 0, 0]
    assert layer_devices(4, -1, [1.0]) == [0, 0, 0, 0, 0]
    # cumulative split: 2 units on cuda:0, 3 on cuda:1
    assert layer_devices(4, 5, [2.0, 3.0]) == [0, 0, 1, 1, 1]
    assert layer_devices(4, 0, [1.0]) == [-1] * 5


def test_token_embedding_stays_on_host():
    s = shape("7b")
    gpus, host = memory_by_device(
        s, LlamaCppSettings(n_ctx=4096), gpus=["cuda:0"], n_gpu_layers=33, tensor_split=[1.0]
    )
    assert host.weights == s.layout.token_embd
    assert gpus[0].weights == sum(s.layout.layers) + s.layout.output
    assert gpus[0].kv_cache == 2048 * MIB


def test_split_units_is_contiguous_and_respects_capacity():
    counts = split_units([10] * 8, [50, 30])
    assert counts is not None and sum(counts) == 8
    assert counts[0] * 10 <= 50 and counts[1] * 10 <= 30
    assert split_units([10] * 8, [35, 35]) is None
    assert split_units([40, 10, 10], [40, 25]) == [1, 2]


def test_weight_layout_totals():
    layout = WeightLayout(token_embd=5, output=7, layers=(3, 4), file_bytes=30)
    assert layout.tensor_bytes == 19 and layout.n_layer == 2
