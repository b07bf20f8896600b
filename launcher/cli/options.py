"""The command line's options, each defined once; the plan options as one value.

`plan`, `pull` and `serve` choose a plan from the same fifteen options. They are the fields of
`PlanFlags` (each annotated with its typer option), and `with_plan_flags` splices them into a
command's parameters, as llama-cpp-python's server generates its flags from its settings
model: a command is written as `command(flags: PlanFlags, <its own options>)`, and typer sees
the plan options first, then the command's own, as one flat list of options.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated, Any, get_type_hints

import typer

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]
AutoOpt = Annotated[
    bool, typer.Option("--auto", help="Detect this machine's hardware (the default).")
]
HardwareOpt = Annotated[
    Path | None,
    typer.Option(
        "--hardware",
        help="Plan for a snapshot from `llmup detect --json`, or `profile`: the --profile's own.",
    ),
]
ModelOpt = Annotated[
    str | None, typer.Option("--model", help="Pin a model id (llama-2-70b-chat) or size (70b).")
]
MaxModelOpt = Annotated[
    str | None,
    typer.Option("--max-model", help="Cap the model size (13b): the largest up to it that fits."),
]
ProfileOpt = Annotated[
    str | None,
    typer.Option(
        "--profile",
        help="A machine profile (see `llmup profiles`) or a .toml file: its settings apply "
        "under the environment and the flags.",
    ),
]
BackendOpt = Annotated[str | None, typer.Option("--backend", help="auto | llama.cpp | exllamav2")]
ContextOpt = Annotated[
    int | None, typer.Option("--context", help="Context length in tokens (default 4096).")
]
KvOpt = Annotated[str | None, typer.Option("--kv-cache", help="KV cache type: f16 | q8_0 | q4_0")]
FlashOpt = Annotated[
    str | None,
    typer.Option(
        "--flash-attn",
        help="llama.cpp flash attention: auto | on | off (auto: on for a machine without "
        "GPUs, off with GPUs; a quantized --kv-cache always has it). On reads long prompts "
        "faster.",
    ),
]
ParallelOpt = Annotated[
    int | None,
    typer.Option(
        "--parallel",
        help="llama.cpp: sessions decoded together, each with its own KV cache of --context "
        "tokens (default: as many as fit, 1-8).",
    ),
]
ImplOpt = Annotated[
    str | None,
    typer.Option(
        "--llamacpp-impl",
        help="llama.cpp worker: slots (llmup's, keeps each session's KV cache; default) or "
        "server (llama-cpp-python's, one request at a time).",
    ),
]
ReserveOpt = Annotated[
    int | None, typer.Option("--reserve-mib", help="MiB kept free per GPU (default 1024).")
]
OffloadOpt = Annotated[
    bool,
    typer.Option("--allow-offload", help="Allow layers on the CPU when the GPUs are too small."),
]
NoVerifyOpt = Annotated[
    bool,
    typer.Option(
        "--no-verify", help="Accept files the hub gives no checksum for (refused otherwise)."
    ),
]
ModelFileOpt = Annotated[
    Path | None,
    typer.Option("--model-file", help="Plan a local GGUF file instead of the catalog."),
]
GpusOpt = Annotated[
    str | None,
    typer.Option(
        "--gpus",
        help="Use only these GPUs: indices or UUIDs as nvidia-smi lists them, e.g. 0,2 "
        "(default: CUDA_VISIBLE_DEVICES, else all).",
    ),
]
MinSpeedOpt = Annotated[
    float | None,
    typer.Option(
        "--min-tokens-per-s",
        help="Pick the largest model expected to decode at least this many tokens/s.",
    ),
]


PlanFileOpt = Annotated[
    Path | None,
    typer.Option("--plan", help="Pull what a saved `llmup plan --json` chose (no planning)."),
]


@dataclass(frozen=True)
class PlanFlags:
    """The options that choose a plan, as `plan`, `pull` and `serve` take them."""

    auto: AutoOpt = False
    hardware: HardwareOpt = None
    profile: ProfileOpt = None
    model: ModelOpt = None
    max_model: MaxModelOpt = None
    backend: BackendOpt = None
    context: ContextOpt = None
    kv_cache: KvOpt = None
    flash_attn: FlashOpt = None
    reserve_mib: ReserveOpt = None
    allow_offload: OffloadOpt = False
    model_file: ModelFileOpt = None
    gpus: GpusOpt = None
    min_tokens_per_s: MinSpeedOpt = None
    parallel: ParallelOpt = None
    llamacpp_impl: ImplOpt = None

    def planning(self) -> dict[str, Any]:
        """What the planner takes from the flags: all but --auto (detection is the default
        anyway) and --profile (it chooses the settings, not the request)."""
        skip = {"auto", "profile"}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}


def with_plan_flags(command: Callable[..., None]) -> Callable[..., None]:
    """`command(flags, **own)` as typer sees it: the PlanFlags fields as options, then the
    command's own parameters; typer's values for the former arrive as one PlanFlags."""
    hints = get_type_hints(PlanFlags, include_extras=True)
    kind = inspect.Parameter.KEYWORD_ONLY
    plan = [
        inspect.Parameter(f.name, kind, default=f.default, annotation=hints[f.name])
        for f in fields(PlanFlags)
    ]
    own = list(inspect.signature(command, eval_str=True).parameters.values())[1:]

    @functools.wraps(command)
    def run(**values: Any) -> None:
        flags = PlanFlags(**{p.name: values.pop(p.name) for p in plan})
        command(flags, **values)

    params = [p.replace(kind=kind) for p in plan + own]
    run.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    run.__annotations__ = {p.name: p.annotation for p in params}
    return run
