"""The planner: every candidate of the catalog (or one local file), ranked by policy.

Policy (DESIGN.md): full accelerator fit, then partial offload (only when allowed), then
CPU only; within a class the larger model, then the higher bits per weight, then the
faster backend for the hardware. The context is never cut below what was asked.
"""

from __future__ import annotations

import logging
from pathlib import Path

from launcher.catalog.loader import Catalog, load_catalog
from launcher.catalog.shape import ModelShape, layout_from_catalog
from launcher.errors import NothingFitsError
from launcher.planning import exllamav2 as exl
from launcher.planning.assemble import candidate_to_plan
from launcher.planning.budget import Budgets, budgets_for
from launcher.planning.candidates import Candidate, place_exllamav2, place_llamacpp
from launcher.planning.llamacpp import KV_TYPE_BYTES, LlamaCppSettings
from launcher.planning.plan import Plan, Rejected
from launcher.planning.request import KV_TO_EXL, PlanRequest
from launcher.weights.gguf_file import read_model_file

log = logging.getLogger(__name__)


def llamacpp_settings(req: PlanRequest) -> LlamaCppSettings:
    """A quantized V cache needs flash attention in llama.cpp, so it turns it on."""
    return LlamaCppSettings(
        n_ctx=req.context,
        n_batch=req.n_batch,
        n_ubatch=req.n_ubatch,
        type_k=req.kv_cache,
        type_v=req.kv_cache,
        flash_attn=req.kv_cache != "f16",
    )


def make_plan(req: PlanRequest, catalog: Catalog | None = None) -> Plan:
    """The best candidate as a Plan; NothingFitsError (with the closest misses) otherwise."""
    req.validate()
    budgets = budgets_for(
        req.hardware, reserve_mib=req.reserve_mib, ram_reserve_mib=req.ram_reserve_mib
    )
    if req.model_file:
        candidates = [_file_candidate(req, budgets)]
    else:
        candidates = list(_catalog_candidates(req, budgets, catalog or load_catalog()))
    fitting = sorted((c for c in candidates if c.fits), key=Candidate.rank_key, reverse=True)
    rejected = [c for c in candidates if not c.fits]
    if not fitting:
        closest = sorted(rejected, key=lambda c: c.miss)[:5]
        raise NothingFitsError(
            f"no candidate fits this machine with a {req.context}-token context",
            closest=[_rejection(c) for c in closest],
        )
    best, *others = fitting
    plan = candidate_to_plan(best, req)
    plan.rejected = [_rejection(c) for c in sorted(rejected, key=lambda c: c.miss)]
    plan.rejected += [_outranked(c, best) for c in others]
    # on an out-of-memory load, serve falls back to these: next in rank, needing less
    smaller = [c for c in others if _need(c) < _need(best)]
    plan.fallbacks = [candidate_to_plan(c, req) for c in smaller[:2]]
    return plan


def _need(c: Candidate) -> int:
    return sum(d.total for d in c.gpus) + (c.host.total if c.host else 0)


def _rejection(c: Candidate) -> Rejected:
    return Rejected(
        model=c.model_id,
        quant=c.quant,
        backend=c.backend,
        reason=c.reason,
        miss_mib=-(-c.miss // (1024 * 1024)),
    )


def _outranked(c: Candidate, best: Candidate) -> Rejected:
    why = "smaller model" if c.params < best.params else "fewer bits per weight"
    if c.params == best.params and round(c.bits_per_weight, 2) == round(best.bits_per_weight, 2):
        why = "same size, ranked lower by backend or quant quality"
    if c.offload != best.offload:
        why = f"{c.offload} offload ranks below {best.offload}"
    return Rejected(model=c.model_id, quant=c.quant, backend=c.backend, reason=f"fits; {why}")


def _catalog_candidates(req: PlanRequest, budgets: Budgets, catalog: Catalog):
    specs = [catalog.get(req.model)] if req.model else list(catalog.models)
    for spec in specs:
        if req.backend in ("auto", "llama.cpp") and spec.gguf:
            yield from _gguf_candidates(spec, req, budgets, catalog)
        if req.backend in ("auto", "exllamav2") and spec.gptq:
            yield from _gptq_candidates(spec, req, budgets)


def _gguf_candidates(spec, req: PlanRequest, budgets: Budgets, catalog: Catalog):
    settings = llamacpp_settings(req)
    for variant in spec.gguf.variants:
        quant = catalog.quant(variant.quant)
        shape = ModelShape(
            arch=spec.architecture, layout=layout_from_catalog(spec.architecture, variant, quant)
        )
        cand = Candidate(
            model_id=spec.id,
            params=spec.params,
            backend="llama.cpp",
            fmt="gguf",
            quant=variant.quant,
            bits_per_weight=variant.bytes * 8 / spec.params,
            legacy=quant.legacy,
            recommended=quant.recommended,
            meta={"spec": spec, "variant": variant, "shape": shape, "settings": settings},
        )
        place_llamacpp(cand, shape, settings, budgets, allow_offload=req.allow_offload)
        yield cand


def _gptq_candidates(spec, req: PlanRequest, budgets: Budgets):
    settings = exl.ExllamaSettings(max_seq_len=req.context, cache_mode=KV_TO_EXL[req.kv_cache])
    for variant in spec.gptq.variants:
        cand = Candidate(
            model_id=spec.id,
            params=spec.params,
            backend="exllamav2",
            fmt="gptq",
            quant=variant.label,
            bits_per_weight=variant.bytes * 8 / spec.params,
            meta={"spec": spec, "variant": variant, "settings": settings},
        )
        if not budgets.has_nvidia:
            if req.backend != "exllamav2":
                continue  # not a candidate on this hardware at all
            cand.reason = "exllamav2 needs an NVIDIA GPU"
            cand.miss = variant.bytes
        elif not variant.exllamav2:
            cand.reason = f"{variant.bits}-bit GPTQ is not supported by exllamav2"
            cand.miss = variant.bytes
        else:
            place_exllamav2(cand, spec, variant, settings, budgets)
        yield cand


def _file_candidate(req: PlanRequest, budgets: Budgets) -> Candidate:
    shape = read_model_file(req.model_file)
    settings = llamacpp_settings(req)
    params = shape.n_params or 1
    types = shape.layout.tensor_types
    quant = shape.quant or max(types, key=types.get, default="?")
    cand = Candidate(
        model_id=Path(req.model_file).stem,
        params=params,
        backend="llama.cpp",
        fmt="gguf",
        quant=quant,
        bits_per_weight=shape.layout.tensor_bytes * 8 / params,
        meta={"shape": shape, "settings": settings, "model_file": str(req.model_file)},
    )
    place_llamacpp(cand, shape, settings, budgets, allow_offload=req.allow_offload)
    return cand


__all__ = ["KV_TYPE_BYTES", "PlanRequest", "make_plan"]
