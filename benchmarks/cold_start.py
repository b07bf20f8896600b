"""Cold start: `llmup serve --model-file M` until its first answered request, against
`python -m llama_cpp.server --model M` alone on the same model.

Run: python benchmarks/cold_start.py [--quick] [--runs 3] [--out benchmarks/results/cold_start.json]

Models: Gemma 3 270M Q4_K_M (the PyPI package's GGUF, a 262k-token vocabulary) and a
generated Llama GGUF (12 layers, 2048 wide, Q8_0, 32k vocabulary); --quick runs one run each
on a tiny generated model. Each server is started `--runs` times, alternating, after one
untimed start of each (so the file is in the page cache and llmup's CPU probe is cached in
its home, as on any start after a user's first). A run is the wall time from the spawn of
the command to the answer of one completion (1 token); the client polls every 10 ms for
readiness (llmup: /health is 200; llama_cpp.server: /v1/models is 200) and then sends it.
llama_cpp.server gets the context llmup planned. llmup's default plan gives its slot worker
`parallel` sequences of that context (the KV cache, which llama.cpp zeroes at load, is that
many times llama_cpp.server's); a third arm, `llmup serve --parallel 1`, loads the same
KV cache as llama_cpp.server, so the launcher's own cost shows apart. Target: llmup (as
planned) within 1.2x.

Run it with the Python of a user's install (the README's first command: requirements.txt,
e.g. `/path/to/user-venv/bin/python benchmarks/cold_start.py`): the test install also holds
selenium's trio, which httpx's transport imports when present (~0.25 s of CPU at every start
that a user's install does not pay); the results say which install ran (`install`).

One more llmup start runs the real CLI with probes on its own functions (timestamps only)
to break its time down: interpreter start; the imports serve needs on its way (taken
together, first); settings and hardware detection; planning, with every GGUF header read
counted and timed apart; printing the plan; pull and launch until the backend process is
spawned; the backend's load until the supervisor finds it ready (its own interpreter and
imports included); the proxy's start; the first request.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
from benchlib import (
    LOOPBACK,
    Run,
    answers,
    bench_model,
    free_port,
    generated_model,
    llmup_command,
    parser,
    print_table,
    spawn,
    stop,
    target,
    wait_until,
)

TARGET_RATIO = 1.2  # a later start of the same plan
FIRST_TARGET_RATIO = 2.0  # the first start in a new llmup home (it measures the machine once)
ONE_SEQUENCE = ("--parallel", "1")  # llama_cpp.server's KV cache: one sequence of the context
GENERATED = dict(n_layer=12, n_embd=2048, n_head=16, n_head_kv=16, n_ff=5632, n_vocab=32000,
                 tensor_type="Q8_0")  # fmt: skip

# Runs `llmup serve` in this interpreter with timestamps around its own stages.
PROBED = r"""
import json, sys, time
from unittest import mock
events = open(sys.argv[1], "a")
def mark(name, **extra):
    events.write(json.dumps({"event": name, "t": time.time(), **extra}) + "\n")
    events.flush()
mark("interpreter")
# what `llmup` (launcher.__main__) does first: the head start of the last launch's backend
from launcher.backends.supervise.headstart import begin
head = begin(sys.argv[2:])
mark("head start", spawned=head.pid is not None)
# the modules llmup serve imports on its way (counted together as "imports")
import launcher.cli
import gguf, launcher.serve, launcher.hardware.detect as hw, launcher.planning.planner as planner
from launcher.backends.supervise.supervisor import Supervisor
mark("imported")
def wrap(owner, name, label):
    real = getattr(owner, name)
    def probe(*args, **kwargs):
        mark(label + ":start")
        try:
            return real(*args, **kwargs)
        finally:
            mark(label + ":end")
    return mock.patch.object(owner, name, probe)
# every header parse, however the module that reads it imported its reader
with wrap(gguf.GGUFReader, "__init__", "header"), wrap(launcher.serve, "serve", "serve"), \
        wrap(Supervisor, "start", "backend"), wrap(hw, "detect", "detect"), \
        wrap(planner, "make_plan", "plan"):
    sys.argv = ["llmup", *sys.argv[2:]]
    try:
        launcher.cli.main(head)
    finally:
        head.discard()
"""


def first_answer(url: str, model: str) -> float:
    """Seconds for one 1-token chat reply; a failed answer stops the benchmark."""
    start = time.monotonic()
    chat = [{"role": "user", "content": "Hello"}]
    reply = httpx.post(
        url + "/v1/chat/completions",
        json={"model": model, "messages": chat, "max_tokens": 1, "temperature": 0},
        timeout=120,
    )
    if reply.status_code != 200:
        raise SystemExit(f"{url} answered {reply.status_code}: {reply.text[:500]}")
    return time.monotonic() - start


def backend_spawned(pid: int) -> bool:
    try:
        children = psutil.Process(pid).children(recursive=True)
        return any("--port" in child.cmdline() for child in children)
    except psutil.Error:
        return False


def start_llmup(
    model: Path,
    home: str,
    folder: Path,
    probed: Path | None = None,
    extra: tuple[str, ...] = (),
    port: int | None = None,
) -> dict:
    """One llmup start: spawn -> backend process -> /health -> first answer (seconds). The
    same `port` makes a start the same command as the last one (a user's, which gets the
    head start)."""
    port = port or free_port()
    command = llmup_command(model, port, *extra)
    if probed is not None:
        command = [sys.executable, "-c", PROBED, str(probed), *command[3:]]
    url = f"http://{LOOPBACK}:{port}"
    t0_wall, t0 = time.time(), time.monotonic()
    proc = spawn(command, folder / "llmup.log", env={"LLMUP_HOME": home})
    try:
        spawned = wait_until(lambda: backend_spawned(proc.pid), proc, timeout=600, poll=0.01)
        ready = wait_until(lambda: answers(url), proc, timeout=600, poll=0.01)
        answer = first_answer(url, model.stem)
    finally:
        stop(proc)
    return {
        "t0_wall": t0_wall,
        "spawned_s": spawned - t0,
        "ready_s": ready - t0,
        "first_request_s": answer,
        "total_s": ready - t0 + answer,
    }


def start_llama_cpp_server(model: Path, context: int, folder: Path) -> dict:
    port = free_port()
    command = [
        sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host", LOOPBACK,
        "--port", str(port), "--n_ctx", str(context),
    ]  # fmt: skip
    url = f"http://{LOOPBACK}:{port}"
    t0 = time.monotonic()
    proc = spawn(command, folder / "llama_cpp_server.log")
    try:
        ready = wait_until(lambda: answers(url, "/v1/models"), proc, timeout=600, poll=0.01)
        answer = first_answer(url, model.stem)
    finally:
        stop(proc)
    return {"ready_s": ready - t0, "first_request_s": answer, "total_s": ready - t0 + answer}


def planned(home: str, model: Path) -> tuple[int, int]:
    """The context and sequences `llmup serve` plans for this model here (llama_cpp.server
    gets the same context, for one sequence)."""
    proc = subprocess.run(
        [sys.executable, "-m", "launcher", "plan", "--model-file", str(model), "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, "LLMUP_HOME": home},
        check=True,
    )
    plan = json.loads(proc.stdout)
    return int(plan["context"]), int(plan["parallel"])


def breakdown(model: Path, home: str, folder: Path, port: int) -> dict[str, Any]:
    """llmup's start in steps, from one probed run (seconds)."""
    events_file = folder / "events.jsonl"
    run = start_llmup(model, home, folder, probed=events_file, port=port)
    events = [json.loads(line) for line in events_file.read_text().splitlines()]
    t0 = run["t0_wall"]
    at = {e["event"]: e["t"] - t0 for e in events}
    head_started = any(e["event"] == "head start" and e["spawned"] for e in events)
    spawned_at = at["head start"] if head_started else at["backend:start"]
    headers = [e for e in events if e["event"].startswith("header:")]
    reads = [(a["t"] - t0, b["t"] - a["t"]) for a, b in zip(headers[::2], headers[1::2])]

    def read_in(start: str, end: str) -> float:
        return sum(d for t, d in reads if at[start] <= t < at[end])

    steps = {
        "interpreter start": at["interpreter"],
        "head start (the last launch's backend spawned)": at["head start"] - at["interpreter"],
        "imports (CLI, detection, planner, serve)": at["imported"] - at["head start"],
        "settings, hardware detection": at["detect:end"] - at["imported"],
        "planning (without header reads)": (
            at["plan:end"] - at["plan:start"] - read_in("plan:start", "plan:end")
        ),
        "GGUF header reads": sum(d for _, d in reads),
        "printing the plan, importing serve": at["serve:start"] - at["plan:end"],
        "pull and spawn or take the head start (without header reads)": (
            at["backend:start"] - at["serve:start"] - read_in("serve:start", "backend:start")
        ),
        "waiting for the backend (supervisor start to ready)": (
            at["backend:end"] - at["backend:start"]
        ),
        "backend, spawn to ready (with a head start: during the steps above)": (
            at["backend:end"] - spawned_at
        ),
        "proxy start": run["ready_s"] - at["backend:end"],
        "first request": run["first_request_s"],
    }
    if (
        abs(
            read_in("plan:start", "plan:end")
            + read_in("serve:start", "backend:start")
            - steps["GGUF header reads"]
        )
        > 1e-6
    ):
        raise SystemExit("a GGUF header was read outside planning and launch: fix the steps")
    return {
        "steps": {k: round(v, 3) for k, v in steps.items()},
        "head_start": head_started,
        "header_reads": len(reads),
        "header_read_s": [round(d, 3) for _, d in reads],
        "total_s": round(run["total_s"], 3),
    }


def measure(name: str, model: Path, runs: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="llmup-cold-") as tmp:
        folder, home = Path(tmp), str(Path(tmp) / "home")
        context, parallel = planned(home, model)
        planned_port, single_port = free_port(), free_port()  # each arm: one command
        start_llmup(model, home, folder, port=planned_port)  # warm-up: page cache, probes
        start_llmup(model, home, folder, extra=ONE_SEQUENCE, port=single_port)
        start_llama_cpp_server(model, context, folder)
        llmup, single, stock, first = [], [], [], []
        for i in range(runs):
            first.append(start_llmup(model, str(Path(tmp) / f"new-home-{i}"), folder))
            llmup.append(start_llmup(model, home, folder, port=planned_port))
            single.append(start_llmup(model, home, folder, extra=ONE_SEQUENCE, port=single_port))
            stock.append(start_llama_cpp_server(model, context, folder))
        steps = breakdown(model, home, folder, planned_port)
    a, one, b, f = (
        statistics.median(r["total_s"] for r in rs) for rs in (llmup, single, stock, first)
    )
    return {
        "model": name,
        "file_mib": round(model.stat().st_size / 2**20, 1),
        "context": context,
        "parallel": parallel,
        "runs": runs,
        "llmup_s": round(a, 3),
        "llmup_first_s": round(f, 3),
        "first_ratio": round(f / b, 3),
        "llmup_first_runs": [round(r["total_s"], 3) for r in first],
        "llmup_one_sequence_s": round(one, 3),
        "llama_cpp_server_s": round(b, 3),
        "ratio": round(a / b, 3),
        "one_sequence_ratio": round(one / b, 3),
        "llmup_runs": [round(r["total_s"], 3) for r in llmup],
        "llmup_one_sequence_runs": [round(r["total_s"], 3) for r in single],
        "llama_cpp_server_runs": [round(r["total_s"], 3) for r in stock],
        "llmup_breakdown": steps,
    }


def models(quick: bool) -> list[tuple[str, Path]]:
    path, name = bench_model(quick)
    chosen = [(name, path)]
    if not quick:
        chosen.append(("generated Llama 12x2048 Q8_0", generated_model("cold-llama", **GENERATED)))
    return chosen


def render(rows: list[dict]) -> None:
    print_table(
        "Cold start to the first answer (s, median)",
        ("model", "MiB", "sequences", "first start", "later start", "--parallel 1",
         "llama_cpp.server", "first ratio", "later ratio", "ratio, 1 seq.", "met"),
        [(r["model"], r["file_mib"], r["parallel"], f"{r['llmup_first_s']:.2f}",
          f"{r['llmup_s']:.2f}", f"{r['llmup_one_sequence_s']:.2f}",
          f"{r['llama_cpp_server_s']:.2f}", f"{r['first_ratio']:.2f}x", f"{r['ratio']:.2f}x",
          f"{r['one_sequence_ratio']:.2f}x",
          "yes" if r["ratio"] <= TARGET_RATIO and r["first_ratio"] <= FIRST_TARGET_RATIO
          else "no") for r in rows],
    )  # fmt: skip
    for r in rows:
        b = r["llmup_breakdown"]
        steps = [(step, f"{s:.3f}") for step, s in b["steps"].items()]
        print_table(
            f"llmup serve's start, step by step: {r['model']} ({b['header_reads']} header reads)",
            ("step", "s"),
            [*steps, ("total", f"{b['total_s']:.3f}")],
        )


def main() -> None:
    args = parser(__doc__, "cold_start")
    args.add_argument("--runs", type=int, default=3, help="timed starts of each (1 with --quick)")
    args = args.parse_args()
    run = Run("cold_start", args.quick)
    rows = [
        measure(name, path, 1 if args.quick else args.runs) for name, path in models(args.quick)
    ]
    render(rows)
    targets = [
        target(f"{r['model']}: later start / llama_cpp.server", r["ratio"], TARGET_RATIO, "at most")
        for r in rows
    ] + [
        target(
            f"{r['model']}: first start (new home) / llama_cpp.server",
            r["first_ratio"],
            FIRST_TARGET_RATIO,
            "at most",
        )
        for r in rows
    ]
    run.write(args.out, {"rows": rows, "install": install()}, targets)


def install() -> dict[str, Any]:
    """Which install ran it: a user's (requirements.txt) or the test install, which also
    holds selenium's trio, which httpx's transport then imports at every start."""
    import importlib.util

    return {
        "python": sys.executable,
        "test_install": importlib.util.find_spec("pytest") is not None,
        "trio": importlib.util.find_spec("trio") is not None,
    }


if __name__ == "__main__":
    main()
