"""The CPU's memory bandwidth and matrix throughput, measured once and cached in the home.

Decoding on the CPU is bound by how fast the cores can stream weights from RAM; prompt
processing by how fast they multiply. Both are measured in well under a second with numpy,
which releases the GIL. Bandwidth: every physical core (llama.cpp's thread count) sums its
own slice of a buffer far larger than any cache, the best of a few passes, and never less
than one core alone reads in CPU time. Multiply rate: one core's float32 matrix product in
CPU time, times the physical cores. CPU time does not count the time other processes run,
so a busy machine does not leave a wrong figure in the cache; llama.cpp's prompt speed
scales with the cores it is given. The matrix product runs in a child Python whose BLAS is
held to one thread (idle BLAS threads spin, which CPU time would count). The figures are
cached per CPU model and core count.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel, ValidationError

from launcher.hardware.snapshot import SystemInfo
from launcher.jsonfile import read_json, write_json_atomic
from launcher.units import MIB

log = logging.getLogger(__name__)

Clock = Callable[[], float]
CACHE_FILE = "cpu-speed.json"
PROBE_TIMEOUT_S = 30.0
CORE_GFLOPS_PROBE = """
import sys, time
import numpy as np
n, repeat = int(sys.argv[1]), int(sys.argv[2])
a = np.full((n, n), 0.5, dtype=np.float32)
a @ a
best = 1e9
for _ in range(6):
    start = time.process_time()
    for _ in range(repeat):
        a @ a
    best = min(best, max(time.process_time() - start, 1e-9))
print(2 * n**3 * repeat / best / 1e9)
"""
ONE_BLAS_THREAD = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "VECLIB_MAXIMUM_THREADS": "1",
}
PROBE_BYTES = 256 * MIB  # well past the last-level cache of desktop and most server CPUs
PASSES = 6
MATMUL_N = 256
MATMUL_REPEAT = 8


class CpuSpeed(BaseModel):
    memory_bandwidth_gbs: float
    gflops: float
    threads: int
    measured_at: str


def cpu_speed(home: Path, system: SystemInfo) -> CpuSpeed:
    """This CPU's figures: from the cache in `home`, else measured now and cached."""
    key = cache_key(system)
    path = Path(home) / CACHE_FILE
    cached = read_json(path)
    records = cached if isinstance(cached, dict) else {}
    if key in records:
        try:
            return CpuSpeed.model_validate(records[key])
        except ValidationError as exc:
            log.warning("re-measuring the CPU: cached figures are malformed (%s)", exc)
    speed = measure_cpu_speed(system.cpu_cores)
    write_json_atomic(path, records | {key: speed.model_dump()})
    return speed


def cache_key(system: SystemInfo) -> str:
    return f"{system.cpu_name or system.arch}|{system.cpu_cores} cores|{system.os}"


def measure_cpu_speed(threads: int) -> CpuSpeed:
    """The figures, the matrix product's child running beside the one-core bandwidth pass
    (both timed in CPU time, on their own cores; the child's matrices fit in its cache) and
    done before the all-cores pass, which is timed on the wall clock."""
    threads = max(threads, 1)
    gflops_child = start_core_gflops()
    try:
        one_core = measure_bandwidth_gbs(1, clock=time.process_time)
        out, _ = gflops_child.communicate(timeout=PROBE_TIMEOUT_S)
    finally:
        if gflops_child.poll() is None:  # it hung, or the bandwidth pass failed
            gflops_child.kill()
            gflops_child.wait()
    if gflops_child.returncode:
        raise subprocess.CalledProcessError(gflops_child.returncode, gflops_child.args, out)
    bandwidth = max(measure_bandwidth_gbs(threads), one_core)
    gflops = float(out.strip().splitlines()[-1]) * threads
    log.info("CPU: %.1f GB/s read bandwidth, %.0f GFLOPS (%d threads)", bandwidth, gflops, threads)
    return CpuSpeed(
        memory_bandwidth_gbs=round(bandwidth, 2),
        gflops=round(gflops, 1),
        threads=threads,
        measured_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def measure_bandwidth_gbs(threads: int, *, clock: Clock = time.perf_counter) -> float:
    """GB/s (1e9) that `threads` threads read, each summing its own slice as uint64."""
    import numpy as np  # only to measure: every run that finds the figures cached skips it

    threads = max(threads, 1)
    slices = np.array_split(np.ones(PROBE_BYTES // 8, dtype=np.uint64), threads)
    with ThreadPoolExecutor(threads) as pool:
        passes = (_timed(lambda: list(pool.map(np.sum, slices)), clock) for _ in range(PASSES))
        best = min(passes)
    return PROBE_BYTES / best / 1e9


def start_core_gflops() -> subprocess.Popen:
    """One core's float32 matrix product rate, in CPU time, from a child Python whose BLAS
    is held to one thread: the child, which prints it."""
    return subprocess.Popen(
        [sys.executable, "-c", CORE_GFLOPS_PROBE, str(MATMUL_N), str(MATMUL_REPEAT)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, **ONE_BLAS_THREAD},
    )


def _timed(fn, clock: Clock) -> float:
    start = clock()
    fn()
    return max(clock() - start, 1e-9)
