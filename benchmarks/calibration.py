"""Plan accuracy: predicted vs measured llama.cpp buffers and peak RSS on generated GGUF models.

Run: python benchmarks/calibration.py [--quick] [--out benchmarks/results/calibration.json]

Grid: four generated Llama models (three small shapes and one of 1.1 GB: 18 layers, 2048
wide, Q8_0, 32k vocabulary) x contexts 512, 2048, 4096, 8192, 16384 x KV cache f16, q8_0,
q4_0 (quantized caches with flash attention, as llama.cpp needs for a quantized V; an f16
cache with it when the plan turns it on, which `--flash-attn auto` does without GPUs). Each
point is planned for this machine's 2-core/24 GB snapshot and loaded in a fresh process by
llama-cpp-python with mmap off (weights in the process's own memory, as the RSS then
counts them), the modules of llmup's default worker imported first, and one batch of up to
512 tokens evaluated, so the compute buffer is used. One sequence (`--parallel 1`): the
grid is the plan's per-sequence arithmetic; tests/calibration/test_calibration.py checks parallel
sequences against the slot worker's load log. Compared: the plan's model, KV and compute
buffers against llama.cpp's load log; the plan's runtime overhead (the serving process)
against the process's RSS before the load; and the plan's total (weights + KV + compute +
overhead) against the process's peak RSS (VmHWM). Reported per component: the largest and
the median absolute error. --quick: one small model, two points.

The compute buffer is sized for a full context; a batch evaluated at the start of an empty
cache touches only the part it uses, so at long contexts the peak RSS stays below the
predicted total by up to the compute buffer (the plan is an upper bound there, by design).
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Any

from benchlib import GIB, MIB, ROOT, Run, generated_model, parser, print_table

sys.path.insert(0, str(ROOT / "tests"))

from support.llamacpp_probe import measure_load, resident_bytes  # noqa: E402

from launcher.hardware.snapshot import load_snapshot  # noqa: E402
from launcher.planning.planner import PlanRequest, make_plan  # noqa: E402

SHAPES = {
    "gqa-q8": dict(n_layer=3, n_embd=1024, n_head=16, n_head_kv=4, n_ff=2816, tensor_type="Q8_0"),
    "q4-vocab32k": dict(
        n_layer=4, n_embd=512, n_head=8, n_head_kv=2, n_ff=1408, tensor_type="Q4_0", n_vocab=32000
    ),
    "wide-f16": dict(n_layer=2, n_embd=2048, n_head=16, n_head_kv=16, n_ff=5504, tensor_type="F16"),
    "llama-1.1g-q8": dict(
        n_layer=18,
        n_embd=2048,
        n_head=16,
        n_head_kv=16,
        n_ff=5632,
        tensor_type="Q8_0",
        n_vocab=32000,
    ),  # fmt: skip
}
CONTEXTS = (512, 2048, 4096, 8192, 16384)
KV_TYPES = ("f16", "q8_0", "q4_0")
QUICK = {"gqa-q8": [(512, "f16"), (2048, "q8_0")]}
COMPONENTS = ("model", "kv", "compute", "process", "total")
# what llmup serve's default worker (the session-slot worker) has imported before its load
SERVING_MODULES = ("launcher.workers.llamacpp_slots.server",)
HARDWARE = ROOT / "tests/data/machines/cpu-2core-24gb.json"


def grid(quick: bool) -> dict[str, list[tuple[int, str]]]:
    if quick:
        return QUICK
    return {name: [(n, kv) for kv in KV_TYPES for n in CONTEXTS] for name in SHAPES}


def point(path: Path, n_ctx: int, kv: str) -> list[dict[str, Any]]:
    """Predicted vs measured MiB of each component at one grid point."""
    plan = make_plan(
        PlanRequest(
            hardware=load_snapshot(HARDWARE),
            model_file=path,
            context=n_ctx,
            kv_cache=kv,
            parallel=1,
        )  # fmt: skip
    )
    got, log = measure_load(
        path, n_ctx=n_ctx, type_k=kv, type_v=kv, flash_attn=plan.settings.flash_attn,
        use_extra_bufts=False,
        use_mmap=False, eval_tokens=min(512, n_ctx - 1), preload=SERVING_MODULES, timeout=600,
    )  # fmt: skip
    pairs = {
        kind: (sum(plan.llamacpp_buffers_mib[kind].values()), sum(getattr(got, kind).values()))
        for kind in ("model", "kv", "compute")
    }
    pairs["process"] = (plan.memory_mib.overhead, resident_bytes(log, "before_load") / MIB)
    pairs["total"] = (plan.memory_mib.total, resident_bytes(log, "peak") / MIB)
    return [
        {"n_ctx": n_ctx, "kv_type": kv, "component": kind, "predicted_mib": round(p, 2),
         "measured_mib": round(m, 2), "error_pct": round(100 * (p - m) / m, 2) if m else None}
        for kind, (p, m) in pairs.items()
    ]  # fmt: skip


def measure(quick: bool) -> tuple[list[dict], dict[str, float]]:
    rows, sizes = [], {}
    for name, points in grid(quick).items():
        path = generated_model(f"calibration-{name}", **SHAPES[name])
        sizes[name] = round(path.stat().st_size / GIB, 3)
        for n_ctx, kv in points:
            rows += [{"model": name, **r} for r in point(path, n_ctx, kv)]
    return rows, sizes


def summary(rows: list[dict]) -> list[dict]:
    out = []
    for kind in COMPONENTS:
        mine = [r for r in rows if r["component"] == kind and r["error_pct"] is not None]
        signed = [r["error_pct"] for r in mine]
        errors = [abs(e) for e in signed]
        worst = max(mine, key=lambda r: abs(r["error_pct"]))
        out.append(
            {"component": kind, "points": len(errors), "max_abs_error_pct": round(max(errors), 2),
             "median_abs_error_pct": round(statistics.median(errors), 2),
             "median_error_pct": round(statistics.median(signed), 2),
             "worst": f"{worst['model']} n_ctx={worst['n_ctx']} kv={worst['kv_type']}"}
        )  # fmt: skip
    return out


def render(rows: list[dict], stats: list[dict]) -> None:
    print_table(
        "Plan vs measured (MiB): llama.cpp's buffers, and the total vs peak RSS with mmap off",
        ("model", "n_ctx", "kv", "component", "predicted", "measured", "error %"),
        [(r["model"], r["n_ctx"], r["kv_type"], r["component"], f"{r['predicted_mib']:.2f}",
          f"{r['measured_mib']:.2f}", f"{r['error_pct']:+.2f}") for r in rows],
    )  # fmt: skip
    print_table(
        "Error per component (predicted vs measured, %)",
        ("component", "points", "max |error|", "median |error|", "median", "worst at"),
        [(s["component"], s["points"], s["max_abs_error_pct"], s["median_abs_error_pct"],
          s["median_error_pct"], s["worst"]) for s in stats],
    )  # fmt: skip


def main() -> None:
    args = parser(__doc__, "calibration").parse_args()
    run = Run("calibration", args.quick)
    rows, sizes = measure(args.quick)
    stats = summary(rows)
    render(rows, stats)
    run.write(args.out, {"model_gib": sizes, "summary": stats, "rows": rows}, [])


if __name__ == "__main__":
    main()
