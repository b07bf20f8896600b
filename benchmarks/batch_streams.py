"""Batching: four streams at once through llmup against llama.cpp's own llama-server, in
alternating rounds, so the machine's drift falls on both.

Run: python benchmarks/batch_streams.py [--quick] [--rounds 8] [--flash-attn on|off]
     [--out benchmarks/results/batch_streams.json]

Both servers run at once on Gemma 3 270M (the PyPI package's GGUF) with four sequences of
2048 tokens each, the same threads and the same flash attention: `llmup serve --parallel 4`
(its slot worker behind the proxy) and `llama-server -np 4`, built from the llama.cpp that
the installed llama-cpp-python vendors (`bash benchmarks/build_llama_server.sh`). Each round
sends four streams of 96 tokens at once (fresh prompts, the end tokens banned so every
reply runs to its length) to one server, then to the other, the order swapped every round;
a round's figure is all its streams' tokens over its wall time. One server waits idle while
the other is measured. Target: the median of the per-round ratios llmup / llama-server at
least 1.0 (the issue's "batches as fast as llama-server"); the spread of the ratios is
printed beside it.

--quick: a generated tiny model, two rounds of two streams of 16 tokens, against
llama-cpp-python's own server under llmup (`--llamacpp-impl server`) when no llama-server
was built (the test suite runs it: the script must not rot).
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path
from typing import Any

from benchlib import Run, parser, print_table, target
from session_servers import Arm, llama_server_binary, start_llama_server, start_llmup
from session_turns import bench_model, concurrent_workload, no_end_bias

CONTEXT, PARALLEL, THREADS = 2048, 4, 2
TARGET_RATIO = 1.0


def shape(quick: bool) -> dict[str, int]:
    return {"streams": 2, "tokens": 16} if quick else {"streams": 4, "tokens": 96}


def start_arms(model: Path, quick: bool, flash_attn: str) -> tuple[Arm, Arm]:
    """llmup's slot worker, and llama-server (or, without a build, llama-cpp-python's server
    under llmup: only for --quick)."""
    llmup = start_llmup(
        model, context=CONTEXT, impl="slots", parallel=PARALLEL, flash_attn=flash_attn
    )
    binary = llama_server_binary()
    if binary is None and not quick:
        llmup.stop()
        raise SystemExit("no llama-server: run `bash benchmarks/build_llama_server.sh` first")
    if binary is None:
        return llmup, start_llmup(model, context=CONTEXT, impl="server", parallel=1)
    anchor = start_llama_server(
        binary, model, context=CONTEXT, parallel=PARALLEL, threads=THREADS, flash_attn=flash_attn
    )
    return llmup, anchor


def rounds(llmup: Arm, anchor: Arm, count: int, work: dict[str, int]) -> list[dict[str, float]]:
    """Each round: both servers' total tokens/s, the order swapped every round."""
    out = []
    for i in range(count):
        order = (llmup, anchor) if i % 2 == 0 else (anchor, llmup)
        figures = {
            arm.name: concurrent_workload(arm, **work)["total_tokens_per_s"] for arm in order
        }
        out.append({"llmup": figures[llmup.name], "anchor": figures[anchor.name]})
    return out


def summary(measured: list[dict[str, float]]) -> dict[str, Any]:
    ratios = [r["llmup"] / r["anchor"] for r in measured]
    return {
        "ratios": [round(r, 3) for r in ratios],
        "median_ratio": round(statistics.median(ratios), 3),
        "min_ratio": round(min(ratios), 3),
        "max_ratio": round(max(ratios), 3),
        "llmup_median_tokens_per_s": round(statistics.median(r["llmup"] for r in measured), 1),
        "anchor_median_tokens_per_s": round(statistics.median(r["anchor"] for r in measured), 1),
    }


def render(result: dict[str, Any]) -> None:
    print_table(
        f"{result['streams']} streams at once, total tokens/s per round "
        f"(flash attention {result['flash_attn']})",
        ("round", "llmup", result["anchor"], "ratio"),
        [
            (
                str(i + 1),
                f"{r['llmup']:.1f}",
                f"{r['anchor']:.1f}",
                f"{r['llmup'] / r['anchor']:.2f}",
            )
            for i, r in enumerate(result["rounds"])
        ],
    )
    s = result["summary"]
    print(
        f"median ratio {s['median_ratio']:.2f} (rounds {s['min_ratio']:.2f} to "
        f"{s['max_ratio']:.2f}); medians {s['llmup_median_tokens_per_s']} vs "
        f"{s['anchor_median_tokens_per_s']} tokens/s"
    )


def main() -> None:
    args = parser(__doc__, "batch_streams")
    args.add_argument("--rounds", type=int, default=8, help="alternating rounds (2 with --quick)")
    args.add_argument("--flash-attn", choices=["on", "off"], default="on")
    args = args.parse_args()
    bench = Run("batch_streams", args.quick)
    work = shape(args.quick)
    with tempfile.TemporaryDirectory() as folder:
        model = bench_model(args.quick, Path(folder))
        llmup, anchor = start_arms(model, args.quick, args.flash_attn)
        try:
            bias = no_end_bias(model, args.quick)
            llmup.extra["logit_bias"] = anchor.extra["logit_bias"] = bias
            measured = rounds(llmup, anchor, 2 if args.quick else args.rounds, work)
        finally:
            llmup.stop()
            anchor.stop()
    result = {
        "model": model.name,
        "anchor": anchor.name,
        "flash_attn": args.flash_attn,
        "context": CONTEXT,
        "parallel": PARALLEL,
        **work,
        "rounds": measured,
        "summary": summary(measured),
    }
    render(result)
    median = result["summary"]["median_ratio"]
    name = f"{work['streams']} streams, median ratio llmup / {anchor.name}"
    bench.write(args.out, result, [target(name, median, TARGET_RATIO, "at least", "x")])


if __name__ == "__main__":
    main()
