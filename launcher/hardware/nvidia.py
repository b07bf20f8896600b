"""NVIDIA GPU detection: NVML first, `nvidia-smi` CSV as the fallback.

NVML (package nvidia-ml-py) is exact and cheap, but the Python binding or the shared
library is missing on many machines that still have a working driver and `nvidia-smi`;
the CSV query covers those. Memory figures are MiB, as both sources report them.
"""

from __future__ import annotations

import logging
import subprocess
from types import ModuleType

from pydantic import ValidationError

from launcher.errors import DetectionError
from launcher.hardware.runner import Runner, run_command
from launcher.hardware.snapshot import Gpu
from launcher.units import MIB

log = logging.getLogger(__name__)

NA = "[N/A]"
BASE_FIELDS = ("index", "name", "memory.total", "memory.used", "memory.free")
FULL_FIELDS = (*BASE_FIELDS, "compute_cap")


def detect_nvidia_gpus(*, run: Runner | None = None, nvml: ModuleType | None = None) -> list[Gpu]:
    """Every NVIDIA GPU with its free memory now; [] on a machine without NVIDIA tools.

    `nvml` replaces the `pynvml` module (tests pass a fake); `run` replaces the subprocess
    runner used for `nvidia-smi`.
    """
    gpus = query_nvml(nvml)
    if gpus is not None:
        return gpus
    return query_nvidia_smi(run or run_command)


def query_nvml(nvml: ModuleType | None = None) -> list[Gpu] | None:
    """GPUs from NVML, or None when NVML is unavailable so the caller can fall back."""
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError:
            log.debug("pynvml is not installed; falling back to nvidia-smi")
            return None
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        log.debug("NVML init failed (%s); falling back to nvidia-smi", exc)
        return None
    try:
        return [_nvml_gpu(nvml, i) for i in range(nvml.nvmlDeviceGetCount())]
    except nvml.NVMLError as exc:
        log.warning("NVML query failed (%s); falling back to nvidia-smi", exc)
        return None
    finally:
        nvml.nvmlShutdown()


def _nvml_gpu(nvml: ModuleType, index: int) -> Gpu:
    """One device; v1 memory info because every driver answers it and its free is exact."""
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    name = nvml.nvmlDeviceGetName(handle)
    mem = nvml.nvmlDeviceGetMemoryInfo(handle)
    return Gpu(
        index=index,
        vendor="nvidia",
        name=name.decode() if isinstance(name, bytes) else name,
        memory_total_mib=mem.total // MIB,
        memory_used_mib=mem.used // MIB,
        memory_free_mib=mem.free // MIB,
        compute_capability=_nvml_compute_capability(nvml, handle),
        uuid=_nvml_text(nvml, nvml.nvmlDeviceGetUUID, handle),
        # '00000000:01:00.0': the address CUDA_DEVICE_ORDER=PCI_BUS_ID sorts by
        pci_bus_id=_nvml_text(nvml, lambda h: nvml.nvmlDeviceGetPciInfo(h).busId, handle),
    )


def _nvml_text(nvml: ModuleType, query, handle: object) -> str | None:
    """A string NVML may answer as bytes (older pynvml) or not at all (older drivers)."""
    try:
        value = query(handle)
    except nvml.NVMLError:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def _nvml_compute_capability(nvml: ModuleType, handle: object) -> str | None:
    """'8.6'-style capability; None on drivers too old to report it."""
    try:
        major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
    except nvml.NVMLError:
        return None
    return f"{major}.{minor}"


def smi_command(fields: tuple[str, ...]) -> list[str]:
    """The nvidia-smi CSV query for `fields`, without header and units so it parses."""
    query = ",".join(fields)
    return ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"]


def query_nvidia_smi(run: Runner) -> list[Gpu]:
    """GPUs from nvidia-smi; drivers before compute_cap existed get the shorter query."""
    try:
        return parse_nvidia_smi_csv(run(smi_command(FULL_FIELDS)), FULL_FIELDS)
    except FileNotFoundError:
        log.debug("nvidia-smi not found; no NVIDIA GPUs")
        return []
    except subprocess.CalledProcessError as exc:
        log.info("nvidia-smi rejected compute_cap (%s); retrying without it", _why(exc))
    except subprocess.TimeoutExpired as exc:
        raise _failed(exc) from None
    try:
        return parse_nvidia_smi_csv(run(smi_command(BASE_FIELDS)), BASE_FIELDS)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        raise _failed(exc) from None


def _why(exc: subprocess.CalledProcessError | subprocess.TimeoutExpired) -> str:
    """First line nvidia-smi printed, which names the real problem (driver, bad field)."""
    for stream in (exc.stderr, exc.output):
        text = stream.decode() if isinstance(stream, bytes) else stream
        if text and text.strip():
            return text.strip().splitlines()[0]
    return str(exc)


def _failed(exc: subprocess.CalledProcessError | subprocess.TimeoutExpired) -> DetectionError:
    return DetectionError(
        f"nvidia-smi is installed but failed: {_why(exc)}; check the driver with "
        "`nvidia-smi`, or describe the machine with `--hardware FILE`"
    )


def parse_nvidia_smi_csv(text: str, fields: tuple[str, ...] = FULL_FIELDS) -> list[Gpu]:
    """Parse `--format=csv,noheader,nounits` output for the given query fields.

    A row llmup cannot read raises DetectionError (planning on a half-read machine would be
    wrong); a GPU that reports [N/A] for total or free memory is skipped with a warning,
    since it cannot be planned on (MIG parent, unsupported board).
    """
    gpus = []
    for line in text.splitlines():
        if line.strip():
            gpu = _parse_row(line, fields)
            if gpu is not None:
                gpus.append(gpu)
    return gpus


def _parse_row(line: str, fields: tuple[str, ...]) -> Gpu | None:
    row = dict(zip(fields, _split_row(line, len(fields)), strict=True))
    if NA in (row["memory.total"], row["memory.free"]):
        log.warning("skipping GPU without memory figures in nvidia-smi output: %r", line)
        return None
    try:
        return Gpu(
            index=int(row["index"]),
            vendor="nvidia",
            name=row["name"],
            memory_total_mib=int(row["memory.total"]),
            memory_free_mib=int(row["memory.free"]),
            memory_used_mib=_optional_int(row["memory.used"]),
            compute_capability=_optional(row.get("compute_cap")),
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        why = f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}"
    except ValueError as exc:
        why = str(exc)
    raise DetectionError(f"unreadable nvidia-smi row {line!r}: {why}")


def _split_row(line: str, n_fields: int) -> list[str]:
    """Split on commas; extra commas belong to the name, the only free-text field."""
    parts = [p.strip() for p in line.split(",")]
    if len(parts) < n_fields:
        raise DetectionError(
            f"unreadable nvidia-smi row {line!r}: expected {n_fields} fields, got {len(parts)}"
        )
    extra = len(parts) - n_fields
    return [parts[0], ", ".join(parts[1 : 2 + extra]), *parts[2 + extra :]]


def _optional(value: str | None) -> str | None:
    return None if value in (None, "", NA) else value


def _optional_int(value: str) -> int | None:
    value = _optional(value)
    return None if value is None else int(value)
