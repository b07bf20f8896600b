"""The planner: every candidate of the catalog (or one local file), ranked by policy.

Policy (docs/architecture.md): full accelerator fit, then partial offload (only when allowed), then
CPU only; within a class the larger model, then the higher bits per weight, then the
faster backend for the hardware. The context is never cut below what was asked. With
`min_tokens_per_s` a candidate expected to decode slower is passed over; a plan expected to
decode slower than people read says so (`speed_floor`).
"""

from __future__ import annotations

import logging

from launcher.catalog.loader import Catalog, load_catalog
from launcher.errors import NothingFitsError
from launcher.planning.assemble import candidate_to_plan
from launcher.planning.candidates import Candidate
from launcher.planning.catalog_candidates import (
    catalog_candidates,
    file_candidate,
    widen_parallel,
)
from launcher.planning.gptq_note import gptq_note
from launcher.planning.machine import machine_for
from launcher.planning.memory_llamacpp import KV_TYPE_BYTES
from launcher.planning.plan import Plan, Rejected
from launcher.planning.request import PlanRequest
from launcher.planning.speed_floor import by_speed, speed_warning
from launcher.units import ceil_mib

log = logging.getLogger(__name__)

FALLBACKS_PER_MODEL = 4  # candidates of each model kept for an out-of-memory load
FALLBACK_STEP = 0.93  # past two of a model, the next kept needs at least 7% less than those


def make_plan(req: PlanRequest, catalog: Catalog | None = None) -> Plan:
    """The best candidate as a Plan; NothingFitsError (with the closest misses) otherwise."""
    req.validate()
    machine = machine_for(req)
    if req.model_file:
        candidates = [file_candidate(req, machine)]
    else:
        candidates = list(catalog_candidates(req, machine, catalog or load_catalog()))
    fitting = sorted((c for c in candidates if c.fits), key=Candidate.rank_key, reverse=True)
    fast, slow = by_speed(fitting, req.min_tokens_per_s)
    rejected = sorted((c for c in candidates if not c.fits), key=lambda c: c.miss)
    if not fast:
        message = _nothing_message(req, slow, rejected)
        raise NothingFitsError(message, closest=_closest(rejected, slow, req))
    best, *others = fast
    chosen = widen_parallel(best, req, machine)
    plan = candidate_to_plan(chosen, req)
    plan.notes = _notes(req, machine)
    plan.notes += filter(None, [gptq_note(best, fast)])
    widen = lambda c: widen_parallel(c, req, machine)  # noqa: E731 - as the flag's plan would
    plan.speed_warning = speed_warning(chosen, fitting, req.readable_tokens_per_s, widen)
    if plan.speed_warning is not None:
        plan.notes.append(plan.speed_warning.message)
    plan.rejected = [_rejection(c) for c in rejected] + [_too_slow(c, req) for c in slow]
    plan.rejected += [_outranked(c, best) for c in others]
    # the fallbacks hold no more sequences than the chosen plan, and need less than it; the
    # first is the same model with one sequence (already downloaded, the cheapest step down)
    widened = [widen_parallel(c, req, machine, most=plan.parallel) for c in others]
    fewer = [best] if chosen is not best else []
    plan.fallbacks = [candidate_to_plan(c, req) for c in fallbacks(chosen, [*fewer, *widened])]
    return plan


def _notes(req: PlanRequest, machine) -> list[str]:
    selected = req.hardware.gpus_selected_by
    return ([f"GPUs narrowed by {selected}"] if selected else []) + list(machine.access.notes)


def _nothing_message(req: PlanRequest, slow: list[Candidate], rejected: list[Candidate]) -> str:
    reasons = {c.reason for c in rejected}
    if not slow and len(reasons) == 1 and not next(iter(reasons)).startswith("needs"):
        return f"no candidate can run here: {next(iter(reasons))}"
    if slow:
        best = max(c.decode_tps for c in slow)
        return (
            f"nothing that fits decodes at {req.min_tokens_per_s:g} tokens/s or more "
            f"(the fastest that fits: {best:g} tokens/s); lower --min-tokens-per-s"
        )
    return f"no candidate fits this machine with a {req.context}-token context"


def _closest(rejected: list[Candidate], slow: list[Candidate], req: PlanRequest) -> list[Rejected]:
    if slow:
        fastest = sorted(slow, key=lambda c: -(c.decode_tps or 0))[:5]
        return [_too_slow(c, req) for c in fastest]
    return [_rejection(c) for c in rejected[:5]]


def fallbacks(best: Candidate, others: list[Candidate]) -> list[Candidate]:
    """What serve may load after an out-of-memory failure: candidates needing less than
    `best`, in rank. Of each model the next two are kept, then only ones needing clearly less,
    so the list spans small and large savings and a measured shortfall finds its match."""
    chosen: list[Candidate] = []
    for c in (c for c in others if need(c) < need(best)):
        same = [need(k) for k in chosen if k.model_id == c.model_id]
        if len(same) < 2 or (
            len(same) < FALLBACKS_PER_MODEL and need(c) < FALLBACK_STEP * min(same)
        ):
            chosen.append(c)
    return chosen


def need(c: Candidate) -> int:
    return sum(d.total for d in c.gpus) + (c.host.total if c.host else 0)


def _speeds(c: Candidate) -> dict:
    if c.speed is None:
        return {}
    return {
        "decode_tokens_per_s": c.speed.decode_tokens_per_s,
        "prompt_tokens_per_s": c.speed.prompt_tokens_per_s,
    }


def _rejection(c: Candidate) -> Rejected:
    return Rejected(
        model=c.model_id,
        quant=c.quant,
        backend=c.backend,
        reason=c.reason,
        miss_mib=ceil_mib(c.miss),
        **_speeds(c),
    )


def _too_slow(c: Candidate, req: PlanRequest) -> Rejected:
    reason = (
        f"fits, but decodes at about {c.decode_tps:g} tokens/s, "
        f"below --min-tokens-per-s {req.min_tokens_per_s:g}"
    )
    return Rejected(model=c.model_id, quant=c.quant, backend=c.backend, reason=reason, **_speeds(c))


def _outranked(c: Candidate, best: Candidate) -> Rejected:
    why = "smaller model" if c.params < best.params else "fewer bits per weight"
    if c.params == best.params and round(c.bits_per_weight, 2) == round(best.bits_per_weight, 2):
        why = "same size, ranked lower by backend or quant quality"
    if c.offload != best.offload:
        why = f"{c.offload} offload ranks below {best.offload}"
    return Rejected(
        model=c.model_id, quant=c.quant, backend=c.backend, reason=f"fits; {why}", **_speeds(c)
    )


__all__ = ["KV_TYPE_BYTES", "PlanRequest", "make_plan"]
