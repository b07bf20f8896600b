"""How fast the CLI answers: `llmup --help`, `llmup plan --hardware FILE`, `llmup detect`.

Run: python benchmarks/cli_speed.py [--quick] [--runs 10] [--out benchmarks/results/cli_speed.json]

Each command runs `--runs` times (3 with --quick) in a fresh process through the installed
`llmup` script, with its home in a temporary folder; `llmup detect` runs once untimed first
so its CPU probe is cached (as it is on every run after a user's first). Reported: the
median and the fastest wall time, and the median CPU time (user + system: what the command
itself costs, which other processes on a busy machine do not inflate). `python -c pass` is
the floor any Python CLI pays. Targets: --help under 300 ms, plan under 500 ms (detect is
held to plan's 500 ms). The slowest imports of `launcher.cli` (python -X importtime) are
listed so a miss names its cause.
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import ROOT, Run, parser, print_table, target

HARDWARE = ROOT / "tests/data/machines/cpu-2core-24gb.json"
TARGETS_MS = {"llmup --help": 300, "llmup plan --hardware FILE": 500, "llmup detect": 500}


def commands() -> dict[str, list[str]]:
    llmup = str(Path(sys.executable).with_name("llmup"))
    return {
        "python -c pass": [sys.executable, "-c", "pass"],
        "llmup --help": [llmup, "--help"],
        "llmup plan --hardware FILE": [llmup, "plan", "--hardware", str(HARDWARE)],
        "llmup detect": [llmup, "detect"],
    }


def timed(command: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one run; a failed run stops the benchmark."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, env=env, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{command} failed: {proc.stderr.decode()[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def measure(runs: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "LLMUP_HOME": home, "COLUMNS": "120"}
        subprocess.run(commands()["llmup detect"], capture_output=True, env=env, check=True)
        for name, command in commands().items():
            times = [timed(command, env) for _ in range(runs)]
            walls = [w * 1000 for w, _ in times]
            rows.append(
                {
                    "command": name,
                    "runs": runs,
                    "median_ms": round(statistics.median(walls), 1),
                    "min_ms": round(min(walls), 1),
                    "cpu_median_ms": round(statistics.median(c * 1000 for _, c in times), 1),
                    "target_ms": TARGETS_MS.get(name),
                }
            )
    return rows


def slowest_imports(count: int = 8) -> list[dict]:
    """The modules whose import (with their own imports) costs most in `import launcher.cli`."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import launcher.cli"],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = []
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, total, name = line.split("|")
        rows.append({"module": name.strip(), "cumulative_ms": int(total) / 1000})
    rows.sort(key=lambda r: -r["cumulative_ms"])
    top = [r for r in rows if r["module"] != "launcher.cli"]
    return [{**r, "cumulative_ms": round(r["cumulative_ms"], 1)} for r in top[:count]]


def main() -> None:
    args = parser(__doc__, "cli_speed")
    args.add_argument("--runs", type=int, default=10, help="runs per command (3 with --quick)")
    args = args.parse_args()
    run = Run("cli_speed", args.quick)
    rows = measure(3 if args.quick else args.runs)
    imports = slowest_imports()
    print_table(
        "CLI wall time (ms)",
        ("command", "median", "fastest", "CPU (median)", "target", "met"),
        [
            (r["command"], r["median_ms"], r["min_ms"], r["cpu_median_ms"],
             f"< {r['target_ms']}" if r["target_ms"] else "-",
             "-" if not r["target_ms"] else ("yes" if r["median_ms"] < r["target_ms"] else "no"))
            for r in rows
        ],
    )  # fmt: skip
    print_table(
        "Slowest imports under `import launcher.cli` (cumulative ms)",
        ("module", "ms"),
        [(r["module"], r["cumulative_ms"]) for r in imports],
    )
    targets = [
        target(f"{r['command']} median", r["median_ms"], r["target_ms"], "below", "ms")
        for r in rows
        if r["target_ms"]
    ]
    run.write(args.out, {"rows": rows, "slowest_imports": imports}, targets)


if __name__ == "__main__":
    main()
