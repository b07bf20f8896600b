"""Predicted vs measured memory of each llama.cpp load, kept per model on this machine.

After a load the supervisor's log holds llama.cpp's own buffer sizes; they are recorded
beside the plan's prediction in `<home>/calibration.json`, so `llmup plan` can show the
measured figure for a model this machine has already run, and a drifting memory model shows
up as figures outside the tolerance (3%, or 8 MiB for small buffers).
"""

from __future__ import annotations

import logging
import re
from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError

from launcher.calibration.llamacpp_log import LoadBuffers, parse_load_log
from launcher.jsonfile import read_json, write_json_atomic
from launcher.planning.plan import Plan

log = logging.getLogger(__name__)

CALIBRATION_FILE = "calibration.json"
FORMAT_VERSION = 1
TOLERANCE_REL = 0.03
TOLERANCE_MIB = 8.0
# plan figure -> LoadBuffers kind measuring it
FIGURES = {"weights": "model", "kv_cache": "kv", "compute": "compute"}
_CUDA = re.compile(r"^CUDA(\d+)$")
_METAL = re.compile(r"^(?:Metal|MTL(\d+))$")


class Figure(BaseModel):
    """One predicted figure beside its measurement."""

    name: str
    predicted_mib: float
    measured_mib: float

    @property
    def error_mib(self) -> float:
        return self.predicted_mib - self.measured_mib

    @property
    def within_tolerance(self) -> bool:
        return within_tolerance(self.predicted_mib, self.measured_mib)


class CalibrationRecord(BaseModel):
    """What one load of one planned model measured, beside what its plan predicted."""

    key: str
    model: str
    quant: str
    context: int
    backend: str
    devices: list[str]
    n_gpu_layers: int
    recorded_at: str
    predicted: dict[str, int] = Field(description="plan.memory_mib")
    predicted_devices: dict[str, dict[str, int]] = Field(default_factory=dict)
    measured: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="kind (model/kv/compute/output) -> buffer -> MiB"
    )
    measured_totals: dict[str, float] = Field(default_factory=dict)
    measured_devices: dict[str, dict[str, float]] = Field(default_factory=dict)
    load: dict[str, str | int | bool | None] = Field(default_factory=dict)
    speed: dict[str, float | str | None] = Field(
        default_factory=dict,
        description="predicted/measured decode and prompt tokens/s, or why it is unmeasurable",
    )


def within_tolerance(predicted: float, measured: float) -> bool:
    """Within 3% of the measurement, or within 8 MiB (small buffers round coarsely)."""
    return abs(predicted - measured) <= max(TOLERANCE_MIB, TOLERANCE_REL * abs(measured))


def model_key(plan: Plan) -> str:
    """Model id + quant + context (and sequences, when several) + KV type + backend +
    device set."""
    devices = "+".join(sorted(d.device for d in plan.placement.devices)) or "cpu"
    kv = plan.settings.kv_cache_type
    ctx = f"{plan.context}x{plan.parallel}" if plan.parallel > 1 else str(plan.context)
    return f"{plan.model.id}|{plan.quant}|ctx={ctx}|kv={kv}|{plan.backend}|{devices}"


def build_record(
    plan: Plan, buffers: LoadBuffers, *, now: datetime | None = None
) -> CalibrationRecord:
    """The record of one load: the plan's figures and the buffers llama.cpp reported."""
    when = (now or datetime.now(timezone.utc)).isoformat(timespec="seconds")
    return CalibrationRecord(
        key=model_key(plan),
        model=plan.model.id,
        quant=plan.quant,
        context=plan.context,
        backend=plan.backend,
        devices=[d.device for d in plan.placement.devices],
        n_gpu_layers=plan.placement.n_gpu_layers,
        recorded_at=when,
        predicted=plan.memory_mib.model_dump(),
        predicted_devices=_predicted_devices(plan),
        measured={k: getattr(buffers, k) for k in ("model", "kv", "compute", "output")},
        measured_totals=_totals(buffers),
        measured_devices=_measured_devices(plan, buffers),
        load=_load_facts(buffers),
    )


def record_load(home: Path, plan: Plan, load_log: str) -> CalibrationRecord | None:
    """Parse a load log and store its record; None when the log holds no buffer sizes."""
    buffers = parse_load_log(load_log)
    if not buffers.model and not buffers.kv_total:
        log.warning("no buffer sizes in the load log (was the backend verbose?); not recorded")
        return None
    record = build_record(plan, buffers)
    earlier = lookup(home, plan)
    if earlier is not None:  # the speed is measured once per plan (speedcheck); keep it
        record.speed = earlier.speed
    save_record(home, record)
    return record


def save_record(home: Path, record: CalibrationRecord) -> Path:
    """Add or replace the record under its key, atomically (temp file + os.replace)."""
    path = Path(home) / CALIBRATION_FILE
    records = _read(path)
    records[record.key] = record.model_dump(mode="json")
    write_json_atomic(path, {"version": FORMAT_VERSION, "records": records})
    return path


def lookup(home: Path, plan: Plan) -> CalibrationRecord | None:
    """The measurement of this planned model on this machine, if it ever ran here."""
    raw = _read(Path(home) / CALIBRATION_FILE).get(model_key(plan))
    if raw is None:
        return None
    try:
        return CalibrationRecord.model_validate(raw)
    except ValidationError as exc:
        log.warning("ignoring a malformed calibration record %s: %s", model_key(plan), exc)
        return None


def compare(record: CalibrationRecord) -> list[Figure]:
    """Predicted beside measured, totals first, then per device when GPUs were used."""
    figures = [
        Figure(
            name=name,
            predicted_mib=record.predicted.get(name, 0),
            measured_mib=record.measured_totals.get(kind, 0.0),
        )
        for name, kind in FIGURES.items()
    ]
    if not record.devices:
        return figures
    for device, predicted in record.predicted_devices.items():
        measured = record.measured_devices.get(device, {})
        figures += [
            Figure(
                name=f"{device} {name}",
                predicted_mib=predicted.get(name, 0),
                measured_mib=measured.get(kind, 0.0),
            )
            for name, kind in FIGURES.items()
        ]
    return figures


def _totals(b: LoadBuffers) -> dict[str, float]:
    return {
        "model": round(b.model_total, 2),
        "kv": round(b.kv_total, 2),
        "compute": round(b.compute_total, 2),
        "output": round(b.output_total, 2),
        "total": round(b.total, 2),
    }


def _load_facts(b: LoadBuffers) -> dict[str, str | int | bool | None]:
    return {
        "n_ctx": b.n_ctx,
        "n_batch": b.n_batch,
        "n_ubatch": b.n_ubatch,
        "type_k": b.type_k,
        "type_v": b.type_v,
        "flash_attn": b.flash_attn,
        "offloaded_layers": b.offloaded_layers,
    }


def _predicted_devices(plan: Plan) -> dict[str, dict[str, int]]:
    """Each GPU's breakdown from the plan; the host gets what the totals leave over."""
    out = {d.device: dict(d.breakdown_mib) for d in plan.placement.devices}
    totals = plan.memory_mib.model_dump()
    host = {
        name: max(totals[name] - sum(dev.get(name, 0) for dev in out.values()), 0)
        for name in ("weights", "kv_cache", "compute", "overhead")
    }
    return out | {"cpu": host}


def plan_device(buffer: str, plan: Plan) -> str:
    """The plan's device holding a llama.cpp buffer: CUDA<i> is the plan's i-th CUDA device
    (llmup makes exactly those visible, in order), Metal is metal:0, the rest is host RAM."""
    if m := _CUDA.match(buffer):
        cuda = [d.device for d in plan.placement.devices if d.device.startswith("cuda:")]
        i = int(m[1])
        return cuda[i] if i < len(cuda) else f"cuda:{i}"
    if m := _METAL.match(buffer):
        return f"metal:{m[1] or 0}"
    return "cpu"


def _measured_devices(plan: Plan, b: LoadBuffers) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for kind in ("model", "kv", "compute", "output"):
        for buffer, mib in getattr(b, kind).items():
            device = out.setdefault(plan_device(buffer, plan), {})
            device[kind] = round(device.get(kind, 0.0) + mib, 2)
    return out


def _read(path: Path) -> dict[str, dict]:
    data = read_json(path)
    records = data.get("records") if isinstance(data, dict) else None
    return records if isinstance(records, dict) else {}
