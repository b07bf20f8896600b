"""What the proxy costs: the same chat requests to the backend directly and through llmup.

Run: python benchmarks/proxy_overhead.py [--quick] [--out benchmarks/results/proxy_overhead.json]

Starts `llmup serve --model-file M`, finds the supervised backend's port (and its per-run
key), and sends the same chat requests (temperature 0, the end tokens banned so that every
reply runs to max_tokens) to both at 1, 4 and 16 concurrent clients. M: Gemma 3 270M (the
PyPI package's GGUF: what a user sees), then a tiny generated Llama (a reply in a few
milliseconds: the proxy's own cost stands out); --quick runs the tiny model only.

- latency: non-streamed, max_tokens 4; p50 and p99 over every request of the cell;
- streaming: streamed, max_tokens 64; tokens/s of all the cell's streams together (text
  chunks received / wall time of the cell).

Two modes. Stateless: every request is the same single message. Sessions: each client holds
a conversation of four turns, then starts another; through llmup it sends only the new
message with X-Session-Id (llmup keeps the history), directly it resends the history itself
(what a client of the bare backend must do). Direct and llmup requests alternate in blocks,
so a change in the machine's load falls on both. Load: bounded in requests and time, sent to
127.0.0.1 only.

The hop alone (tiny model only): one client, a stateless 1-token chat, direct and through
llmup alternating in blocks of 10; p50 of each. Streaming at one client (tiny model only):
64-token streams direct, through llmup and through a bare relay (`bare_relay.py`: raw ASGI
on the same uvicorn/aiohttp stack, no checks: the least a Python relay costs here),
alternating; tokens/s of each and the CPU per stream of llmup and of the bare relay.

Targets (per mode and concurrency): p50 added < 2 ms, p99 added < 10 ms, streaming through
llmup >= 98% of direct; the hop: p50 added < 1 ms.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
from bare_relay import bare_relay
from benchlib import (
    LOOPBACK,
    Conversation,
    Reply,
    Run,
    backend_key,
    backend_port,
    backend_process,
    bench_model,
    bounded_load,
    llmup_serving,
    no_end_bias,
    parser,
    percentile,
    print_table,
    served_model,
    target,
)

CONCURRENCY = (1, 4, 16)
MODES = ("stateless", "session")
LATENCY_TOKENS, STREAM_TOKENS = 4, 64
BLOCKS = 2  # direct, llmup, direct, llmup
PHASE_DEADLINE_S = 180


@dataclass
class Sizes:
    latency_requests: int  # per target and cell
    streams_per_client: int


FULL, QUICK = Sizes(160, 2), Sizes(16, 1)
HOP_REQUESTS = {True: 60, False: 300}  # 1-token chats per target (--quick, full)
HOP_TARGET_MS = 1.0
FLOOR_STREAMS = {True: 10, False: 30}  # 64-token streams per target at one client


def targets_of(proc, url: str) -> dict[str, tuple[str, str, str, bool]]:
    """name -> (OpenAI base URL, key, model id, whether the server keeps session history)."""
    backend = backend_process(proc)
    direct, key = f"http://{LOOPBACK}:{backend_port(backend)}/v1", backend_key(backend)
    model = served_model(direct, key)
    return {
        "direct": (direct, key, model, False),
        "llmup": (url + "/v1", "none", model, True),
    }


def conversations(targets, mode: str, concurrency: int, bias) -> dict[str, list[Conversation]]:
    return {
        name: [
            Conversation(
                url,
                key,
                model,
                f"bench-{concurrency}-{c}",
                bias=bias,
                session=mode == "session",
                server_keeps_history=keeps,
            )  # fmt: skip
            for c in range(concurrency)
        ]
        for name, (url, key, model, keeps) in targets.items()
    }


def block(chats: list[Conversation], *, stream: bool, requests: int) -> tuple[list[Reply], float]:
    """`requests` requests from len(chats) clients at once; (replies, wall seconds)."""
    clients = [httpx.Client(timeout=120) for _ in chats]
    tokens = STREAM_TOKENS if stream else LATENCY_TOKENS
    start = time.perf_counter()
    try:
        replies = bounded_load(
            lambda c, _i: chats[c].send(clients[c], stream=stream, max_tokens=tokens),
            requests=requests,
            concurrency=len(chats),
            deadline_s=PHASE_DEADLINE_S / (2 * BLOCKS),
        )
    finally:
        for client in clients:
            client.close()
    return replies, time.perf_counter() - start


def cpu_s(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return times.user + times.system


def cell(targets, proxy: psutil.Process, mode: str, concurrency: int, sizes: Sizes, bias) -> dict:
    """Both targets' latency and streaming in one cell, alternating; the proxy process's CPU
    time is counted over each target's non-streamed requests."""
    chats = conversations(targets, mode, concurrency, bias)
    got = {n: {"latency": [], "streams": [], "wall": 0.0, "proxy_cpu_s": 0.0} for n in chats}
    streams = concurrency * sizes.streams_per_client
    for b in range(BLOCKS):
        order = list(chats) if b % 2 == 0 else list(reversed(chats))
        for name in order:
            before = cpu_s(proxy)
            replies, _ = block(chats[name], stream=False, requests=sizes.latency_requests // BLOCKS)
            got[name]["proxy_cpu_s"] += cpu_s(proxy) - before
            got[name]["latency"] += [r.latency_s * 1000 for r in replies]
        for name in order:
            replies, wall = block(chats[name], stream=True, requests=max(1, streams // BLOCKS))
            got[name]["streams"] += replies
            got[name]["wall"] += wall
    return {name: summarize(g) for name, g in got.items()}


def summarize(got: dict[str, Any]) -> dict[str, Any]:
    latency, streams = got["latency"], got["streams"]
    per_stream = [(r.chunks - 1) / (r.latency_s - r.ttft_s) for r in streams if r.chunks > 1]
    return {
        "requests": len(latency),
        "proxy_cpu_ms_per_request": round(1000 * got["proxy_cpu_s"] / len(latency), 3),
        "p50_ms": round(statistics.median(latency), 2),
        "p99_ms": round(percentile(latency, 99), 2),
        "streams": len(streams),
        "stream_tokens": sum(r.chunks for r in streams),
        "tokens_per_s": round(sum(r.chunks for r in streams) / got["wall"], 2),
        "per_stream_tokens_per_s": round(statistics.median(per_stream), 2) if per_stream else None,
        "ttft_p50_ms": round(statistics.median(r.ttft_s * 1000 for r in streams), 2),
    }


def hop(targets, proxy: psutil.Process, requests: int) -> dict[str, Any]:
    """The hop alone: one client, a stateless 1-token chat, direct and through llmup
    alternating in blocks of 10; p50 of each and the proxy's CPU per request."""
    chats = conversations(targets, "stateless", 1, None)
    got: dict[str, dict[str, Any]] = {n: {"ms": [], "cpu_s": 0.0} for n in chats}
    with httpx.Client(timeout=120) as client:
        for _ in range(max(1, requests // 10)):
            for name, (chat,) in chats.items():
                before = cpu_s(proxy)
                for _ in range(10):
                    got[name]["ms"].append(
                        chat.send(client, stream=False, max_tokens=1).latency_s * 1000
                    )
                got[name]["cpu_s"] += cpu_s(proxy) - before
    p50 = {n: statistics.median(g["ms"]) for n, g in got.items()}
    return {
        "requests": len(got["llmup"]["ms"]),
        "direct_p50_ms": round(p50["direct"], 3),
        "llmup_p50_ms": round(p50["llmup"], 3),
        "p50_added_ms": round(p50["llmup"] - p50["direct"], 3),
        "proxy_cpu_ms_per_request": round(
            1000 * got["llmup"]["cpu_s"] / len(got["llmup"]["ms"]), 3
        ),
    }


def one_client_streams(targets, proxy: psutil.Process, streams: int, bias) -> dict[str, Any]:
    """64-token streams at one client: direct, through a bare relay and through llmup,
    alternating in blocks of 2; tokens/s of each, CPU per stream of the two relays."""
    direct_url, key, model, _ = targets["direct"]
    with bare_relay(direct_url, key) as (relay, relay_url):
        sides = {**targets, "bare": (relay_url, key, model, False)}
        procs = {"llmup": proxy, "bare": psutil.Process(relay.pid)}
        got = stream_blocks(conversations(sides, "stateless", 1, bias), procs, streams)
    rate = {n: g["tokens"] / g["wall"] for n, g in got.items()}
    return {
        "streams": streams,
        **{f"{n}_tokens_per_s": round(rate[n], 1) for n in ("direct", "bare", "llmup")},
        "llmup_ratio": round(rate["llmup"] / rate["direct"], 3),
        "bare_ratio": round(rate["bare"] / rate["direct"], 3),
        **{f"{n}_cpu_ms_per_stream": round(1000 * got[n]["cpu_s"] / streams, 2) for n in procs},
    }


def stream_blocks(chats, procs: dict[str, psutil.Process], streams: int) -> dict[str, dict]:
    got = {n: {"tokens": 0, "wall": 0.0, "cpu_s": 0.0} for n in chats}
    with httpx.Client(timeout=120) as client:
        for _ in range(max(1, streams // 2)):
            for name, (chat,) in chats.items():
                before = cpu_s(procs[name]) if name in procs else 0.0
                start = time.perf_counter()
                for _ in range(2):
                    got[name]["tokens"] += chat.send(client, stream=True, max_tokens=64).chunks
                got[name]["wall"] += time.perf_counter() - start
                got[name]["cpu_s"] += cpu_s(procs[name]) - before if name in procs else 0.0
    return got


def measure(model: Path, name: str, sizes: Sizes, tiny: bool = False, quick: bool = False):
    rows = []
    bias = no_end_bias(model)
    with llmup_serving(model) as (proc, url):
        targets, proxy = targets_of(proc, url), psutil.Process(proc.pid)
        if tiny:
            rows.append({"model": name, "mode": "hop", **hop(targets, proxy, HOP_REQUESTS[quick])})
            print(f"hop: {rows[-1]}", flush=True)
            floor = one_client_streams(targets, proxy, FLOOR_STREAMS[quick], bias)
            rows.append({"model": name, "mode": "streams1", **floor})
            print(f"one client's streams: {rows[-1]}", flush=True)
        for mode in MODES:
            for concurrency in CONCURRENCY:
                got = cell(targets, proxy, mode, concurrency, sizes, bias)
                rows.append({"model": name, "mode": mode, "concurrency": concurrency,
                             **compare(got)})  # fmt: skip
    return rows


def compare(got: dict[str, dict]) -> dict[str, Any]:
    direct, llmup = got["direct"], got["llmup"]
    return {
        "direct": direct,
        "llmup": llmup,
        "p50_added_ms": round(llmup["p50_ms"] - direct["p50_ms"], 2),
        "p99_added_ms": round(llmup["p99_ms"] - direct["p99_ms"], 2),
        "stream_ratio": round(llmup["tokens_per_s"] / direct["tokens_per_s"], 3),
        "proxy_cpu_ms_per_request": llmup["proxy_cpu_ms_per_request"],
    }


def row_targets(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        if r["mode"] == "streams1":
            continue  # the same target as the stateless x1 cell's; this row is its anchor
        if r["mode"] == "hop":
            name = f"{r['model']}: proxy hop, p50 added to a 1-token chat"
            out.append(target(name, r["p50_added_ms"], HOP_TARGET_MS, "below", "ms"))
            continue
        cell_name = f"{r['model']}, {r['mode']} x{r['concurrency']}"
        out += [
            target(f"{cell_name}: p50 added", r["p50_added_ms"], 2, "below", "ms"),
            target(f"{cell_name}: p99 added", r["p99_added_ms"], 10, "below", "ms"),
            target(f"{cell_name}: streaming vs direct", r["stream_ratio"], 0.98, "at least"),
        ]
    return out


def render(rows: list[dict]) -> None:
    hops = [r for r in rows if r["mode"] == "hop"]
    floors = [r for r in rows if r["mode"] == "streams1"]
    rows = [r for r in rows if r["mode"] not in ("hop", "streams1")]
    print_table(
        "The hop alone: a 1-token chat, one client",
        ("model", "requests", "p50 direct ms", "p50 llmup ms", "added ms", "proxy CPU/req"),
        [(r["model"], r["requests"], r["direct_p50_ms"], r["llmup_p50_ms"],
          f"{r['p50_added_ms']:+.3f}", f"{r['proxy_cpu_ms_per_request']:.2f} ms") for r in hops],
    )  # fmt: skip
    print_table(
        "64-token streams at one client: direct, a bare relay, llmup",
        ("model", "streams", "direct tok/s", "bare tok/s", "llmup tok/s", "bare/direct",
         "llmup/direct", "bare CPU/stream", "llmup CPU/stream"),
        [(r["model"], r["streams"], r["direct_tokens_per_s"], r["bare_tokens_per_s"],
          r["llmup_tokens_per_s"], f"{100 * r['bare_ratio']:.1f}%",
          f"{100 * r['llmup_ratio']:.1f}%", f"{r['bare_cpu_ms_per_stream']:.2f} ms",
          f"{r['llmup_cpu_ms_per_stream']:.2f} ms") for r in floors],
    )  # fmt: skip
    print_table(
        "Through llmup vs the backend directly; latency ms, streaming tokens/s",
        ("model", "mode", "clients", "p50 direct", "p50 llmup", "added", "p99 direct",
         "p99 llmup", "added", "tok/s direct", "tok/s llmup", "ratio", "proxy CPU/req"),
        [(r["model"], r["mode"], r["concurrency"], r["direct"]["p50_ms"], r["llmup"]["p50_ms"],
          f"{r['p50_added_ms']:+.2f}", r["direct"]["p99_ms"], r["llmup"]["p99_ms"],
          f"{r['p99_added_ms']:+.2f}", r["direct"]["tokens_per_s"], r["llmup"]["tokens_per_s"],
          f"{100 * r['stream_ratio']:.1f}%", f"{r['proxy_cpu_ms_per_request']:.2f} ms")
         for r in rows],
    )  # fmt: skip


def main() -> None:
    args = parser(__doc__, "proxy_overhead").parse_args()
    run = Run("proxy_overhead", args.quick)
    # Gemma: what a user sees; the tiny model (a reply in a few ms) isolates the proxy's cost
    models = [bench_model(True)] if args.quick else [bench_model(False), bench_model(True)]
    sizes = QUICK if args.quick else FULL
    tiny = bench_model(True)[1]
    rows = [
        row
        for model, name in models
        for row in measure(model, name, sizes, tiny=name == tiny, quick=args.quick)
    ]
    render(rows)
    results = {"models": [name for _, name in models], "latency_max_tokens": LATENCY_TOKENS,
               "stream_max_tokens": STREAM_TOKENS, "rows": rows}  # fmt: skip
    run.write(args.out, results, row_targets(rows))


if __name__ == "__main__":
    main()
