"""Turning a fitting candidate into the Plan contract (MiB figures, source, settings)."""

from __future__ import annotations

from launcher.planning.candidates import Candidate
from launcher.planning.plan import (
    DeviceNeed,
    JoinSpec,
    LeftOut,
    MemoryMiB,
    Placement,
    Plan,
    PlannedModel,
    Settings,
    Source,
    Speed,
)
from launcher.planning.request import PlanRequest
from launcher.units import MIB, ceil_mib

SLOT_RAM_MAX_MIB = 2048  # saved session states in RAM: half of what is left, at most this


def _source(c: Candidate) -> Source:
    if "model_file" in c.meta:
        return Source(local_path=c.meta["model_file"], download_bytes=0)
    spec, variant = c.meta["spec"], c.meta["variant"]
    if c.fmt == "gptq":
        return Source(
            repo_id=spec.gptq.repo_id,
            revision=variant.branch,
            files=list(spec.gptq.files),
            download_bytes=variant.bytes,
        )
    join = JoinSpec(output=variant.file, parts=variant.parts) if variant.parts else None
    return Source(
        repo_id=spec.gguf.repo_id,
        revision=spec.gguf.revision,
        files=list(variant.parts or [variant.file]),
        download_bytes=variant.bytes,
        join=join,
    )


def _memory(c: Candidate) -> MemoryMiB:
    devices = [*c.gpus, c.host]
    weights = sum(d.weights for d in devices)
    kv = sum(d.kv_cache for d in devices)
    compute = sum(d.compute for d in devices)
    overhead = sum(d.overhead + sum(d.extra.values()) for d in devices)
    return MemoryMiB(
        weights=ceil_mib(weights),
        kv_cache=ceil_mib(kv),
        compute=ceil_mib(compute),
        overhead=ceil_mib(overhead),
        total=ceil_mib(weights + kv + compute + overhead),
    )


def _placement(c: Candidate) -> Placement:
    devices = [
        DeviceNeed(
            device=d.device,
            need_mib=ceil_mib(d.total),
            budget_mib=gpu.budget // MIB,
            layers=d.layers,
            breakdown_mib={
                "weights": ceil_mib(d.weights),
                "kv_cache": ceil_mib(d.kv_cache),
                "compute": ceil_mib(d.compute),
                "overhead": ceil_mib(d.overhead + sum(d.extra.values())),
            },
            name=gpu.name or None,
            uuid=gpu.uuid,
        )
        for d, gpu in zip(c.gpus, c.gpu_devices)
    ]
    return Placement(
        n_gpu_layers=c.n_gpu_layers,
        tensor_split=c.tensor_split,
        devices=devices,
        ram_need_mib=ceil_mib(c.host.total),
        ram_budget_mib=c.host_budget // MIB,
        offload=c.offload,
        left_out=[LeftOut(device=k, reason=v) for k, v in sorted(c.excluded.items())],
    )


def _speed(c: Candidate) -> Speed | None:
    if c.speed is None:
        return None
    return Speed(
        decode_tokens_per_s=c.speed.decode_tokens_per_s,
        prompt_tokens_per_s=c.speed.prompt_tokens_per_s,
        basis=list(c.speed.basis),
        assumed=c.speed.assumed,
    )


def _settings(c: Candidate, req: PlanRequest) -> Settings:
    s = c.meta["settings"]
    if c.backend == "exllamav2":
        return Settings(
            kv_cache_type=s.cache_mode, cache_mode=s.cache_mode, flash_attn=s.flash_attn
        )
    return Settings(
        n_batch=s.n_batch,
        n_ubatch=s.n_ubatch,
        kv_cache_type=s.type_k,
        flash_attn=s.flash_attn,
        llamacpp_impl=req.llamacpp_impl,
        slot_ram_mib=slot_ram_mib(c) if req.llamacpp_impl == "slots" else 0,
    )


def slot_ram_mib(c: Candidate) -> int:
    """RAM for saved session states: half of what the host budget leaves, at most 2 GiB."""
    left = max(c.host_budget - c.host.total, 0) // MIB
    return min(left // 2, SLOT_RAM_MAX_MIB)


def _llamacpp_buffers(c: Candidate) -> dict[str, dict[str, float]] | None:
    """The buffer sizes llama.cpp should log at load, by its own device names: the launch
    makes exactly the planned GPUs visible, in plan order, so the i-th is CUDA<i>."""
    if c.backend != "llama.cpp":
        return None
    out: dict[str, dict[str, float]] = {"model": {}, "kv": {}, "compute": {}}
    cuda = [d.device for d in c.gpus if d.device.startswith("cuda:")]
    for d in [*c.gpus, c.host]:
        kind = d.device.partition(":")[0]
        name = {"cpu": "CPU", "metal": "Metal"}.get(kind) or f"CUDA{cuda.index(d.device)}"
        for key, value in (("model", d.weights), ("kv", d.kv_cache), ("compute", d.compute)):
            if value:
                out[key][name] = round(value / MIB, 2)
    out["output"] = {"CPU": round(c.host.extra.get("output", 0) / MIB, 2)}
    return out


def candidate_to_plan(c: Candidate, req: PlanRequest) -> Plan:
    spec = c.meta.get("spec")
    from_file = "model_file" in c.meta
    return Plan(
        llamacpp_buffers_mib=_llamacpp_buffers(c),
        model=PlannedModel(
            id=c.model_id,
            params=c.params,
            label=spec.label if spec else None,
            chat_format=spec.chat_format if spec else None,
            gguf_chat_template=bool(c.meta["shape"].chat_template) if from_file else None,
        ),
        backend=c.backend,
        format=c.fmt,
        quant=c.quant,
        bits_per_weight=round(c.bits_per_weight, 2),
        source=_source(c),
        context=req.context,
        parallel=c.meta["settings"].n_seq_max if c.backend == "llama.cpp" else 1,
        placement=_placement(c),
        memory_mib=_memory(c),
        settings=_settings(c, req),
        speed=_speed(c),
    )
