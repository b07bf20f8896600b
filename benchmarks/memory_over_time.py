"""Memory over time: resident memory of the proxy and of the backend under a long run.

Run: python benchmarks/memory_over_time.py [--quick] [--out FILE]
(default FILE: benchmarks/results/memory_over_time.json)

Starts `llmup serve --model-file <Gemma 3 270M>` (--quick: a tiny generated model) and sends,
from four clients at once, 1,000 stateless chat requests (every other one streamed,
max_tokens 8), then 200 session turns (conversations of 20 turns, X-Session-Id, llmup keeps
the history). The RSS of the `llmup serve` process (the proxy) and of the supervised backend
is read after every 50 requests (10 turns). --quick sends 100 requests and 40 turns.

Target: flat within 10%. The first sample of each workload is the baseline (allocators and
caches warm up on the first requests); every later sample must stay within 10% of it.
Load: bounded in requests and time, sent to 127.0.0.1 only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import psutil
from benchlib import (
    MIB,
    Conversation,
    Run,
    backend_process,
    bench_model,
    bounded_load,
    llmup_serving,
    no_end_bias,
    parser,
    print_table,
    served_model,
    target,
)

CLIENTS = 4
MAX_TOKENS = 8
TURNS_PER_SESSION = 20
LIMIT = 0.10
# (requests, sample every) per workload
FULL = {"stateless": (1000, 50), "session": (200, 10)}
QUICK = {"stateless": (100, 20), "session": (40, 10)}


def workload(chat: dict, kind: str, total: int, every: int, procs) -> list[dict]:
    """Send `total` requests in chunks of `every`, sampling both processes' RSS after each;
    `chat` holds the Conversation fields every client shares (url, key, model, bias)."""
    chats = [
        Conversation(
            **chat,
            tag=f"mem-{c}",
            session=kind == "session",
            server_keeps_history=True,
            turns=TURNS_PER_SESSION,
        )  # fmt: skip
        for c in range(CLIENTS)
    ]
    clients = [httpx.Client(timeout=120) for _ in chats]
    samples, sent = [], 0
    try:
        while sent < total:
            done = bounded_load(
                lambda c, i: chats[c].send(clients[c], stream=i % 2 == 0, max_tokens=MAX_TOKENS),
                requests=min(every, total - sent),
                concurrency=CLIENTS,
                deadline_s=300,
            )
            sent += len(done)
            samples.append({"requests": sent, **{n: p.memory_info().rss for n, p in procs.items()}})
    finally:
        for client in clients:
            client.close()
    return samples


def growth(samples: list[dict], name: str) -> dict[str, Any]:
    base = samples[0][name]
    values = [s[name] for s in samples]
    return {
        "baseline_mib": round(base / MIB, 1),
        "max_mib": round(max(values) / MIB, 1),
        "last_mib": round(values[-1] / MIB, 1),
        "max_growth": round(max(values) / base - 1, 4),
        "last_growth": round(values[-1] / base - 1, 4),
    }


def measure(model: Path, sizes: dict[str, tuple[int, int]]) -> dict[str, Any]:
    out = {}
    with llmup_serving(model) as (proc, url):
        procs = {"proxy": psutil.Process(proc.pid), "backend": backend_process(proc)}
        chat = {"url": url + "/v1", "key": "none", "model": served_model(url + "/v1"),
                "bias": no_end_bias(model)}  # fmt: skip
        for kind, (total, every) in sizes.items():
            samples = workload(chat, kind, total, every, procs)
            out[kind] = {"samples": samples, **{n: growth(samples, n) for n in procs}}
    return out


def main() -> None:
    args = parser(__doc__, "memory_over_time").parse_args()
    run = Run("memory_over_time", args.quick)
    model, name = bench_model(args.quick)
    got = measure(model, QUICK if args.quick else FULL)
    rows = [
        (kind, process, g["baseline_mib"], g["max_mib"], g["last_mib"],
         f"{100 * g['max_growth']:+.1f}%", "yes" if g["max_growth"] <= LIMIT else "no")
        for kind, res in got.items() for process, g in res.items() if process != "samples"
    ]  # fmt: skip
    print_table(
        f"RSS over a long run ({name}; MiB)",
        ("workload", "process", "baseline", "max", "last", "max growth", "within 10%"),
        rows,
    )
    targets = [
        target(f"{kind} {process}: RSS growth", res[process]["max_growth"], LIMIT, "at most")
        for kind, res in got.items()
        for process in ("proxy", "backend")
    ]
    run.write(args.out, {"model": name, "clients": CLIENTS, "workloads": got}, targets)


if __name__ == "__main__":
    main()
