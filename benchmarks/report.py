"""Render benchmarks/README.md's result sections from the results files.

Run: python benchmarks/report.py [--check] [--results DIR] [--readme FILE]
(defaults: benchmarks/results, benchmarks/README.md)

Each figure's section in the README lies between `<!-- BEGIN results:NAME -->` and
`<!-- END results:NAME -->`; this replaces what is between them with the run's command,
machine, load, its tables and its targets, rendered from results/NAME.json. The prose
around the markers is written by hand. --check changes nothing and exits 1 when the README
is not what the results files give (tests run it, so the page never drifts from its data).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import tool_turns as tools_bench
from benchlib import RESULTS, ROOT

MARKERS = re.compile(
    r"(<!-- BEGIN results:(?P<name>[\w-]+) -->\n).*?(<!-- END results:(?P=name) -->)", re.DOTALL
)


def md_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        return "-" if value is None else str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def header(report: dict[str, Any]) -> str:
    m, load = report["machine"], report["load_average"]
    kind = " (--quick)" if report.get("quick") else ""
    return (
        f"Command: `{report['command']}`{kind}, {report['wall_s']:.0f} s, {m['date']}.  \n"
        f"Machine: {m['cpu']}, {m['physical_cores']} cores ({m['logical_cores']} logical), "
        f"{m['ram_gib']} GiB RAM, {m['os']}, Python {m['python']}, llama-cpp-python "
        f"{m['llama_cpp_python']}.  \n"
        f"Load average (1 min) before and after: {load['before'][0]} and {load['after'][0]} "
        f"on {m['logical_cores']} cores."
    )


def targets_table(report: dict[str, Any]) -> str:
    targets = report.get("targets") or []
    if not targets:
        return ""
    rows = [
        (t["name"], _fmt(t["value"], t["unit"]), f"{t['direction']} {_fmt(t['limit'], t['unit'])}",
         {True: "met", False: "**missed**", None: "not measured"}[t["met"]])
        for t in targets
    ]  # fmt: skip
    return md_table(("target", "measured", "limit", "met"), rows)


def _fmt(value: Any, unit: str) -> str:
    if value is None:
        return "-"
    return f"{value:g} {unit}".strip()


def _pct(value: float) -> str:
    return f"{value:+.1f}%"


def calibration(r: dict[str, Any]) -> list[str]:
    summary = md_table(
        ("component", "points", "max abs. error", "median abs. error", "median error", "worst at"),
        [(s["component"], s["points"], f"{s['max_abs_error_pct']:.2f}%",
          f"{s['median_abs_error_pct']:.2f}%", _pct(s["median_error_pct"]), s["worst"])
         for s in r["summary"]],
    )  # fmt: skip
    components = [s["component"] for s in r["summary"]]
    per_model = []
    for model, gib in r["model_gib"].items():
        mine = [x for x in r["rows"] if x["model"] == model]
        worst = [
            max(abs(x["error_pct"] or 0) for x in mine if x["component"] == kind)
            for kind in components
        ]
        points = len(mine) // len(components)
        per_model.append((model, f"{gib:.3f}", points, *(f"{w:.2f}%" for w in worst)))
    columns = ("model", "GiB", "points", *(f"{kind}: max abs. error" for kind in components))
    models = md_table(columns, per_model)
    return [summary, models]


def proxy_overhead(r: dict[str, Any]) -> list[str]:
    rows = [
        (x["model"], x["mode"], x["concurrency"], x["direct"]["p50_ms"], x["llmup"]["p50_ms"],
         f"{x['p50_added_ms']:+.2f}", x["direct"]["p99_ms"], x["llmup"]["p99_ms"],
         f"{x['p99_added_ms']:+.2f}", x["direct"]["tokens_per_s"], x["llmup"]["tokens_per_s"],
         f"{100 * x['stream_ratio']:.1f}%", x["proxy_cpu_ms_per_request"])
        for x in r["rows"] if x["mode"] not in ("hop", "streams1")
    ]  # fmt: skip
    hop = md_table(
        ("model", "1-token chats", "p50 direct ms", "p50 llmup ms", "p50 added ms",
         "proxy CPU ms/request"),
        [(x["model"], x["requests"], x["direct_p50_ms"], x["llmup_p50_ms"],
          f"{x['p50_added_ms']:+.3f}", x["proxy_cpu_ms_per_request"])
         for x in r["rows"] if x["mode"] == "hop"],
    )  # fmt: skip
    floor = md_table(
        ("model", "64-token streams a side", "direct tok/s", "bare relay tok/s", "llmup tok/s",
         "bare/direct", "llmup/direct", "bare relay CPU ms/stream", "llmup CPU ms/stream"),
        [(x["model"], x["streams"], x["direct_tokens_per_s"], x["bare_tokens_per_s"],
          x["llmup_tokens_per_s"], f"{100 * x['bare_ratio']:.1f}%",
          f"{100 * x['llmup_ratio']:.1f}%",
          x["bare_cpu_ms_per_stream"], x["llmup_cpu_ms_per_stream"])
         for x in r["rows"] if x["mode"] == "streams1"],
    )  # fmt: skip
    columns = ("model", "mode", "clients", "p50 direct ms", "p50 llmup ms", "p50 added",
               "p99 direct ms", "p99 llmup ms", "p99 added", "direct tok/s", "llmup tok/s",
               "llmup/direct", "proxy CPU ms/request")  # fmt: skip
    note = (
        f"Latency: non-streamed, max_tokens {r['latency_max_tokens']}; streaming: max_tokens "
        f"{r['stream_max_tokens']}, all streams of a cell together; proxy CPU: the `llmup serve` "
        "process's CPU time per non-streamed request."
    )
    hops = [hop] if any(x["mode"] == "hop" for x in r["rows"]) else []
    floors = [floor] if any(x["mode"] == "streams1" for x in r["rows"]) else []
    return [*hops, *floors, note, md_table(columns, rows)]


def cold_start(r: dict[str, Any]) -> list[str]:
    main = md_table(
        ("model", "file MiB", "context", "sequences", "runs", "first start s", "later start s",
         "llmup --parallel 1 s", "llama_cpp.server s", "first ratio", "later ratio",
         "ratio, 1 sequence"),
        [(x["model"], x["file_mib"], x["context"], x["parallel"], x["runs"],
          f"{x['llmup_first_s']:.2f}", f"{x['llmup_s']:.2f}",
          f"{x['llmup_one_sequence_s']:.2f}", f"{x['llama_cpp_server_s']:.2f}",
          f"{x['first_ratio']:.2f}x", f"{x['ratio']:.2f}x", f"{x['one_sequence_ratio']:.2f}x")
         for x in r["rows"]],
    )  # fmt: skip
    parts = [x["llmup_breakdown"] for x in r["rows"]]
    rows = [(step, *(f"{b['steps'][step]:.3f}" for b in parts)) for step in parts[0]["steps"]]
    rows.append(("GGUF header reads (count)", *(b["header_reads"] for b in parts)))
    rows.append(("head start", *("yes" if b.get("head_start") else "no" for b in parts)))
    rows.append(("total (this run)", *(f"{b['total_s']:.3f}" for b in parts)))
    breakdown = md_table(("llmup step (s)", *(x["model"] for x in r["rows"])), rows)
    install = r.get("install")
    if install is None:
        return [main, breakdown]
    kind = "the test install" if install["test_install"] else "a user's install"
    trio = " (with trio)" if install["trio"] else ""
    return [main, breakdown, f"Run with {kind}{trio}: `{install['python']}`."]


def cli_speed(r: dict[str, Any]) -> list[str]:
    main = md_table(
        ("command", "runs", "median ms", "fastest ms", "CPU ms (median)", "target ms"),
        [(x["command"], x["runs"], x["median_ms"], x["min_ms"], x["cpu_median_ms"],
          f"< {x['target_ms']}" if x["target_ms"] else "-") for x in r["rows"]],
    )  # fmt: skip
    imports = md_table(
        ("slowest imports of `launcher.cli`", "cumulative ms"),
        [(f"`{x['module']}`", x["cumulative_ms"]) for x in r["slowest_imports"]],
    )
    return [main, imports]


def memory_over_time(r: dict[str, Any]) -> list[str]:
    rows = []
    for kind, res in r["workloads"].items():
        sent = res["samples"][-1]["requests"]
        for process in ("proxy", "backend"):
            g = res[process]
            rows.append((kind, sent, process, g["baseline_mib"], g["max_mib"], g["last_mib"],
                         _pct(100 * g["max_growth"])))  # fmt: skip
    columns = ("workload", "requests", "process", "baseline MiB", "max MiB", "last MiB",
               "max growth")  # fmt: skip
    return [f"Model: {r['model']}; {r['clients']} clients at once.", md_table(columns, rows)]


def plan_speed(r: dict[str, Any]) -> list[str]:
    rows = [
        (x["source"], x["device"], x["model"], x["figure"], x["predicted_tokens_per_s"],
         x["reference_tokens_per_s"], _pct(x["error_pct"]) if x["error_pct"] is not None else "-",
         "yes" if x["within_30pct"] else f"no: {x['note']}")
        for x in r["rows"]
    ]  # fmt: skip
    columns = ("source", "device", "model", "figure", "predicted tok/s", "reference tok/s",
               "error", "within 30%")  # fmt: skip
    return [md_table(columns, rows)]


def session_turns(r: dict[str, Any]) -> list[str]:
    arms = r["arms"]
    shape = r["conditions"]["shape"]
    parts = [
        f"Model: {r['conditions']['model']}; context {shape['context']} per session, "
        f"{shape['parallel']} sequences in llmup and slots in llama-server, "
        f"{r['conditions']['threads']} threads; TTFT in seconds, mean over the sessions."
    ]
    for workload in ("interleaved", "eight_on_four"):
        columns = [
            [statistics.fmean(turn) for turn in arms[name].get(workload, [])] for name in arms
        ]
        rows = [
            (turn, *(f"{v:.3f}" for v in values)) for turn, values in enumerate(zip(*columns), 1)
        ]
        parts.append(md_table((f"{workload}: turn", *arms), rows))
    rows = [
        (name, f"{a['concurrent']['one_stream_tokens_per_s']:.1f}",
         f"{a['concurrent']['total_tokens_per_s']:.1f} ({a['concurrent']['streams']})",
         " / ".join(f"{v:.0f}" for v in a["rss_mib"].values()))
        for name, a in arms.items()
    ]  # fmt: skip
    columns = ("server", "1 stream tok/s", "N streams total tok/s", "RSS MiB (after each)")
    parts.append(md_table(columns, rows))
    return parts


def scale_out(r: dict[str, Any]) -> list[str]:
    c = r["conditions"]
    note = (
        f"{c['clients']} clients, {c['sessions_per_arm']} sessions of {c['turns_per_session']} "
        f"turns per arm, max_tokens {c['max_tokens']}, non-streamed; {c['postgresql']}, "
        f"{c['haproxy'].split(' - ')[0]}; latency of one turn, p50 and p99."
    )
    rows = [
        (x["model"], x["arm"], x["turns"], x["turns_per_s"], x["p50_ms"], x["p99_ms"])
        for m in r["models"]
        for x in m["rows"]
    ]
    arms = md_table(("model", "arm", "turns", "turns/s", "p50 ms", "p99 ms"), rows)
    names = {"postgres_vs_sqlite": "PostgreSQL vs SQLite",
             "postgres_vs_sqlite_store_only": "PostgreSQL vs SQLite, the store's work only",
             "haproxy_hop": "HAProxy hop",
             "haproxy_hop_health_only": "HAProxy hop, GET /health only"}  # fmt: skip
    added = md_table(
        ("model", "added per turn", "p50 ms", "p99 ms"),
        [(m["model"], names[k], f"{o['p50_ms']:+.2f}", f"{o['p99_ms']:+.2f}")
         for m in r["models"] for k, o in m["overhead"].items()],
    )  # fmt: skip
    deaths = md_table(
        ("model", "replica killed to its session's next answered turn, s (each run)"),
        [(m["model"], ", ".join(f"{d:.2f}" for d in m["failover_s"])) for m in r["models"]],
    )
    store = md_table(
        ("model", "store", "load + commit of a turn, p50 ms", "p99 ms"),
        [(m["model"], kind, c["p50_ms"], c["p99_ms"]) for m in r["models"]
         for kind, c in m["store_only"].items()],
    )  # fmt: skip
    return [note, arms, added, store, deaths]


def responses_chain(r: dict[str, Any]) -> list[str]:
    c = r["conditions"]
    note = (
        f"Model: {c['model']}; {c['turns']} turns per arm, ~{c['words_per_message']}-word user "
        f"messages, {c['max_tokens']} tokens per reply, streamed; TTFT in seconds; prompt "
        "tokens and those taken from a KV cache (`cached_tokens`)."
    )
    rows = [
        (i, f"{a['ttft_s']:.3f}", f"{a['prompt_tokens']} / {a['cached_tokens']}",
         f"{b['ttft_s']:.3f}", f"{b['prompt_tokens']} / {b['cached_tokens']}")
        for i, (a, b) in enumerate(zip(r["arms"]["chain"], r["arms"]["resend"]), 1)
    ]  # fmt: skip
    columns = ("turn", "chain TTFT", "chain prompt / cached", "resend TTFT",
               "resend prompt / cached")  # fmt: skip
    return [note, md_table(columns, rows)]


def tool_turns(r: dict[str, Any]) -> list[str]:
    shape = r["conditions"]["shape"]
    parts = [
        f"Model: {r['conditions']['model']}; context {shape['context']}, two sessions "
        f"interleaved, {shape['words']}-word user messages and {shape['reply']}-token "
        "replies; TTFT in seconds."
    ]
    parts.append(md_table(tools_bench.TURN_COLUMNS, tools_bench.turn_rows(r)))
    parts.append(md_table(tools_bench.ROUND_COLUMNS, tools_bench.round_rows(r)))
    return parts


def batch_streams(r: dict[str, Any]) -> list[str]:
    s = r["summary"]
    rows = [
        (i + 1, f"{x['llmup']:.1f}", f"{x['anchor']:.1f}", f"{x['llmup'] / x['anchor']:.2f}")
        for i, x in enumerate(r["rounds"])
    ]
    return [
        f"Model: {r['model']}; {r['parallel']} sequences of {r['context']} tokens each, flash "
        f"attention {r['flash_attn']}; {r['streams']} streams of {r['tokens']} tokens at once "
        f"per round, total tokens/s; the order alternates every round.",
        md_table(("round", "llmup", r["anchor"], "ratio"), rows),
        f"Median ratio {s['median_ratio']:.2f} (rounds from {s['min_ratio']:.2f} to "
        f"{s['max_ratio']:.2f}); median tokens/s {s['llmup_median_tokens_per_s']} (llmup) and "
        f"{s['anchor_median_tokens_per_s']} ({r['anchor']}).",
    ]


RENDERERS: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "calibration": calibration,
    "proxy_overhead": proxy_overhead,
    "cold_start": cold_start,
    "cli_speed": cli_speed,
    "memory_over_time": memory_over_time,
    "plan_speed": plan_speed,
    "session_turns": session_turns,
    "scale_out": scale_out,
    "responses_chain": responses_chain,
    "tool_turns": tool_turns,
    "batch_streams": batch_streams,
}


def section(name: str, results: Path) -> str:
    path = results / f"{name}.json"
    if not path.exists():
        return f"_No results yet: run the command above (writes `results/{name}.json`)._\n"
    report = json.loads(path.read_text())
    parts = [header(report), *RENDERERS[name](report), targets_table(report)]
    return "\n\n".join(p for p in parts if p) + "\n"


def render(readme: str, results: Path) -> str:
    def fill(match: re.Match) -> str:
        name = match.group("name")
        if name not in RENDERERS:
            raise SystemExit(f"README names results:{name}, which report.py cannot render")
        return match.group(1) + section(name, results) + match.group(3)

    return MARKERS.sub(fill, readme)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--check", action="store_true", help="exit 1 if the README is out of date")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--readme", type=Path, default=ROOT / "benchmarks/README.md")
    args = p.parse_args()
    before = args.readme.read_text()
    after = render(before, args.results)
    if args.check:
        if after != before:
            sys.exit(f"{args.readme} is out of date: run python benchmarks/report.py")
        print(f"{args.readme} matches {args.results}")
        return
    args.readme.write_text(after)
    print(f"rendered {len(MARKERS.findall(after))} sections into {args.readme}")


if __name__ == "__main__":
    main()
