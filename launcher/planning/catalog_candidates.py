"""Every candidate to rank: each GGUF and GPTQ variant of the catalog, or one local file,
placed on the machine and given its expected speed."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from launcher.catalog.loader import Catalog
from launcher.catalog.models import Architecture, ModelSpec
from launcher.catalog.shape import ModelShape, layout_from_catalog
from launcher.catalog.shape_cache import model_file_shape
from launcher.planning import memory_exllamav2 as exl
from launcher.planning.candidates import Candidate
from launcher.planning.machine import Machine, ModelCost
from launcher.planning.memory_llamacpp import LlamaCppSettings
from launcher.planning.place_exllamav2 import place_exllamav2
from launcher.planning.place_llamacpp import place_llamacpp
from launcher.planning.request import KV_TO_EXL, PlanRequest

MAX_AUTO_PARALLEL = 8  # sequences the planner gives the slot worker when it picks


def llamacpp_settings(req: PlanRequest) -> LlamaCppSettings:
    """The llama.cpp settings a request asks for (flash attention: `flash_attention`)."""
    return LlamaCppSettings(
        n_ctx=req.context,
        n_batch=req.n_batch,
        n_ubatch=req.n_ubatch,
        type_k=req.kv_cache,
        type_v=req.kv_cache,
        flash_attn=flash_attention(req),
        n_seq_max=req.fixed_parallel or 1,
    )


def flash_attention(req: PlanRequest) -> bool:
    """As asked; "auto" is on for a machine without GPUs, where it was measured (a 7,200-token
    prompt read 1.44x faster by Gemma 3 270M on 2 cores, decoding unchanged, and a smaller
    compute buffer, which the planner counts) and off with GPUs until it is measured there.
    A quantized V cache needs it in llama.cpp, so that turns it on whatever was asked."""
    if req.kv_cache != "f16":
        return True
    if req.flash_attn == "auto":
        return not req.hardware.gpus
    return req.flash_attn == "on"


def widen_parallel(
    cand: Candidate, req: PlanRequest, machine: Machine, *, most: int = MAX_AUTO_PARALLEL
) -> Candidate:
    """The chosen llama.cpp candidate with as many sequences (up to `most`) as still fit in
    what is left, placed alike (same offload, same layers on the GPUs): the model is chosen
    for one sequence first, so parallel sessions never cost a smaller model."""
    if cand.backend != "llama.cpp" or req.fixed_parallel is not None:
        return cand
    widest = cand
    for n in range(2, most + 1):
        settings = replace(cand.meta["settings"], n_seq_max=n)
        wider = _placed_gguf(_unplaced(cand, settings), cand.meta["shape"], settings, req, machine)
        placed = (wider.offload, wider.n_gpu_layers)
        if not wider.fits or placed != (cand.offload, cand.n_gpu_layers):
            break
        widest = wider
    return widest


def _unplaced(cand: Candidate, settings: LlamaCppSettings) -> Candidate:
    return Candidate(
        model_id=cand.model_id,
        params=cand.params,
        backend=cand.backend,
        fmt=cand.fmt,
        quant=cand.quant,
        bits_per_weight=cand.bits_per_weight,
        legacy=cand.legacy,
        recommended=cand.recommended,
        meta={**cand.meta, "settings": settings},
    )


def catalog_candidates(req: PlanRequest, machine: Machine, catalog: Catalog) -> Iterator[Candidate]:
    specs = [catalog.get(req.model)] if req.model else list(catalog.models)
    if req.max_model and not req.model:
        cap = catalog.get(req.max_model).params
        specs = [spec for spec in specs if spec.params <= cap]
    for spec in specs:
        if req.backend in ("auto", "llama.cpp") and spec.gguf:
            yield from _gguf_candidates(spec, req, machine, catalog)
        if req.backend in ("auto", "exllamav2") and spec.gptq:
            yield from _gptq_candidates(spec, req, machine)


def _cost(arch: Architecture, params: int, token_embd_bytes: int) -> ModelCost:
    """Untied models read one row of the input embedding per token; tied ones multiply by
    the whole matrix as their output layer."""
    embedding = 0 if arch.tied_embeddings else arch.n_vocab * arch.n_embd
    unread = 0 if arch.tied_embeddings else token_embd_bytes
    return ModelCost(matmul_params=params - embedding, host_unread=unread, n_embd=arch.n_embd)


def _gguf_candidates(spec: ModelSpec, req: PlanRequest, machine: Machine, catalog: Catalog):
    settings = llamacpp_settings(req)
    for variant in spec.gguf.variants:
        quant = catalog.quant(variant.quant)
        layout = layout_from_catalog(spec.architecture, variant, quant)
        shape = ModelShape(arch=spec.architecture, layout=layout)
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
        yield _placed_gguf(cand, shape, settings, req, machine)


def _placed_gguf(cand, shape: ModelShape, settings, req: PlanRequest, machine: Machine):
    cost = _cost(shape.arch, cand.params, shape.layout.token_embd)
    place_llamacpp(
        cand,
        shape,
        settings,
        machine.llamacpp_budgets,
        allow_offload=req.allow_offload,
        score=machine.score(cost),
    )
    machine.attach_speed(cand, cost)
    return cand


def _gptq_candidates(spec: ModelSpec, req: PlanRequest, machine: Machine):
    settings = exl.ExllamaSettings(max_seq_len=req.context, cache_mode=KV_TO_EXL[req.kv_cache])
    why_not = _exllamav2_why_not(machine)
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
        if why_not:
            if req.backend != "exllamav2":
                continue  # not a candidate on this machine; only a pinned backend says why
            cand.reason, cand.miss = why_not, variant.bytes
        elif not variant.exllamav2:
            cand.reason = f"{variant.bits}-bit GPTQ is not supported by exllamav2"
            cand.miss = variant.bytes
        else:
            cost = _cost(spec.architecture, spec.params, spec.gptq.embedding_bytes)
            place_exllamav2(cand, spec, variant, settings, machine.budgets, machine.score(cost))
            machine.attach_speed(cand, cost)
        yield cand


def _exllamav2_why_not(machine: Machine) -> str | None:
    if not machine.budgets.has_nvidia:
        return "exllamav2 needs an NVIDIA GPU"
    return machine.access.exllamav2_why_not


def file_candidate(req: PlanRequest, machine: Machine) -> Candidate:
    shape = model_file_shape(req.model_file, home=req.home)
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
    return _placed_gguf(cand, shape, settings, req, machine)
