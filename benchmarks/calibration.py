"""Predicted vs measured llama.cpp buffers on generated GGUF models.

Run: python benchmarks/calibration.py [--out benchmarks/results/calibration.json]
Prints a table and writes every row (MiB) as JSON, so a change of the memory model or of
the llama.cpp build shows up as a diff of the results file.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from ggufgen import write_llama_gguf  # noqa: E402
from llamacpp_probe import measure_load  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from launcher.hardware.snapshot import load_snapshot  # noqa: E402
from launcher.planning.planner import PlanRequest, make_plan  # noqa: E402

SHAPES = {
    "gqa-q8": dict(n_layer=3, n_embd=1024, n_head=16, n_head_kv=4, n_ff=2816, tensor_type="Q8_0"),
    "q4-vocab32k": dict(
        n_layer=4, n_embd=512, n_head=8, n_head_kv=2, n_ff=1408, tensor_type="Q4_0", n_vocab=32000
    ),
    "wide-f16": dict(n_layer=2, n_embd=2048, n_head=16, n_head_kv=16, n_ff=5504, tensor_type="F16"),
}
RUNS = [(512, "f16"), (2048, "f16"), (8192, "f16"), (4096, "q8_0")]


def measure(folder: Path) -> list[dict]:
    hw = load_snapshot(ROOT / "tests/data/machines/cpu-2core-24gb.json")
    rows = []
    for name, shape in SHAPES.items():
        path = write_llama_gguf(folder / f"{name}.gguf", **shape)
        for n_ctx, kv in RUNS:
            plan = make_plan(PlanRequest(hardware=hw, model_file=path, context=n_ctx, kv_cache=kv))
            got, _ = measure_load(
                path,
                n_ctx=n_ctx,
                type_k=kv,
                type_v=kv,
                flash_attn=kv != "f16",
                use_extra_bufts=False,
            )
            for kind in ("model", "kv", "compute"):
                p = sum(plan.llamacpp_buffers_mib[kind].values())
                m = sum(getattr(got, kind).values())
                rows.append(
                    {
                        "model": name,
                        "n_ctx": n_ctx,
                        "kv_type": kv,
                        "buffer": kind,
                        "predicted_mib": round(p, 2),
                        "measured_mib": round(m, 2),
                        "error_pct": round(100 * (p - m) / m, 2) if m else None,
                    }
                )
    return rows


def render(rows: list[dict]) -> None:
    table = Table(title="llama.cpp buffers: plan vs load log (MiB)")
    for col in ("model", "n_ctx", "kv", "buffer", "predicted", "measured", "error %"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            r["model"],
            str(r["n_ctx"]),
            r["kv_type"],
            r["buffer"],
            f"{r['predicted_mib']:.2f}",
            f"{r['measured_mib']:.2f}",
            f"{r['error_pct']:+.2f}",
        )
    Console().print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/calibration.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(Path(tmp))
    render(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    worst = max(abs(r["error_pct"] or 0) for r in rows)
    Console().print(f"worst error {worst:.2f}% over {len(rows)} figures; written to {args.out}")


if __name__ == "__main__":
    main()
