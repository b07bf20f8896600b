"""Which GPUs llmup may use: `--gpus 0,2`, else an inherited CUDA_VISIBLE_DEVICES.

Both are read as CUDA reads CUDA_VISIBLE_DEVICES: a comma list of indices or UUIDs
(a unique prefix such as `GPU-8f3a` is enough), in the order given. Indices are
nvidia-smi's, i.e. PCI bus order, which is what CUDA uses under CUDA_DEVICE_ORDER=PCI_BUS_ID;
the backend is launched with exactly that order and the planned indices made visible.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from launcher.errors import UsageError
from launcher.hardware.snapshot import Gpu, HardwareSnapshot

log = logging.getLogger(__name__)

ENV = "CUDA_VISIBLE_DEVICES"


def select_gpus(
    snapshot: HardwareSnapshot, *, gpus: str | None = None, environ: Mapping[str, str] | None = None
) -> HardwareSnapshot:
    """The snapshot narrowed to `--gpus` (strict: an unknown GPU is an error), or else to
    CUDA_VISIBLE_DEVICES from `environ` (lenient, as CUDA is: it stops at an unknown entry).

    Pass `environ` only for this machine; a snapshot of another machine is not narrowed by
    this shell's environment.
    """
    nvidia = [g for g in snapshot.gpus if g.vendor == "nvidia"]
    if gpus is not None:
        chosen = _pick(snapshot.gpus, gpus, strict=True)
        return _narrowed(snapshot, chosen, f"--gpus {gpus}")
    if environ is None or ENV not in environ or not nvidia:
        return snapshot
    value = environ[ENV]
    chosen = _pick(nvidia, value, strict=False)
    others = [g for g in snapshot.gpus if g.vendor != "nvidia"]
    _warn_about_order(environ, chosen)
    return _narrowed(snapshot, [*chosen, *others], f"{ENV}={value}")


def _narrowed(snapshot: HardwareSnapshot, chosen: list[Gpu], why: str) -> HardwareSnapshot:
    return snapshot.model_copy(update={"gpus": chosen, "gpus_selected_by": why})


def _pick(gpus: list[Gpu], spec: str, *, strict: bool) -> list[Gpu]:
    """The GPUs `spec` names, in its order; an empty spec names none (CPU only)."""
    chosen: list[Gpu] = []
    entries = [e.strip() for e in spec.split(",")] if spec.strip() else []
    for entry in entries:
        gpu = _match(gpus, entry)
        if gpu is None:
            if strict:
                known = ", ".join(str(g.index) for g in gpus) or "none"
                raise UsageError(f"--gpus {spec}: no GPU {entry!r} here (GPUs: {known})")
            log.warning(
                "%s=%s: %r names no GPU; CUDA ignores it and what follows", ENV, spec, entry
            )
            break
        if gpu not in chosen:
            chosen.append(gpu)
    return chosen


def _match(gpus: list[Gpu], entry: str) -> Gpu | None:
    if entry.isdigit():
        return next((g for g in gpus if g.index == int(entry)), None)
    hits = [g for g in gpus if entry and g.uuid and g.uuid.lower().startswith(entry.lower())]
    return hits[0] if len(hits) == 1 else None


def _warn_about_order(environ: Mapping[str, str], chosen: list[Gpu]) -> None:
    """Indices mean nvidia-smi's order only under PCI_BUS_ID; CUDA's default may differ."""
    names = {g.name for g in chosen}
    if environ.get("CUDA_DEVICE_ORDER") != "PCI_BUS_ID" and len(names) > 1:
        log.warning(
            "%s is read in nvidia-smi (PCI bus) order; set CUDA_DEVICE_ORDER=PCI_BUS_ID so "
            "other CUDA programs read it the same way",
            ENV,
        )
