"""The CPU's memory bandwidth and matrix throughput, measured once and cached in the home.

Decoding on the CPU is bound by how fast the cores can stream weights from RAM; prompt
processing by how fast they multiply. Both are measured here in well under a second with
numpy, which releases the GIL: every physical core (llama.cpp's thread count) sums its own
slice of a buffer far larger than any cache, and a float32 matrix product gives the
multiply rate. The best of a few passes counts, since a busy machine only ever slows a pass.
The figures are cached per CPU model and core count, so later runs read them back.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ValidationError

from launcher.hardware.snapshot import SystemInfo
from launcher.jsonfile import read_json, write_json_atomic
from launcher.units import MIB

log = logging.getLogger(__name__)

CACHE_FILE = "cpu-speed.json"
PROBE_BYTES = 256 * MIB  # well past the last-level cache of desktop and most server CPUs
PASSES = 6
MATMUL_N = 512
MATMUL_PASSES = 8


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
    bandwidth = measure_bandwidth_gbs(threads)
    gflops = measure_gflops()
    log.info("CPU: %.1f GB/s read bandwidth, %.0f GFLOPS (%d threads)", bandwidth, gflops, threads)
    return CpuSpeed(
        memory_bandwidth_gbs=round(bandwidth, 2),
        gflops=round(gflops, 1),
        threads=threads,
        measured_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def measure_bandwidth_gbs(threads: int) -> float:
    """GB/s (1e9) that `threads` threads read, each summing its own slice as uint64."""
    threads = max(threads, 1)
    slices = np.array_split(np.ones(PROBE_BYTES // 8, dtype=np.uint64), threads)
    with ThreadPoolExecutor(threads) as pool:
        best = min(_timed(lambda: list(pool.map(np.sum, slices))) for _ in range(PASSES))
    return PROBE_BYTES / best / 1e9


def measure_gflops() -> float:
    """float32 matrix product rate (numpy's BLAS, all its threads)."""
    a = np.full((MATMUL_N, MATMUL_N), 0.5, dtype=np.float32)
    a @ a  # warm up: BLAS thread pool start, page faults
    best = min(_timed(lambda: a @ a) for _ in range(MATMUL_PASSES))
    return 2 * MATMUL_N**3 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return max(time.perf_counter() - start, 1e-9)
