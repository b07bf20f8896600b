"""llmup's own GGUF worker: session slots and continuous batching on llama.cpp's C API.

Started by the supervisor as ``python -m launcher.workers.llamacpp_slots.server --model PATH
--port N [--parallel S --context C ...]``; it binds 127.0.0.1, answers only requests that
carry the run's backend key (`backend_key`), and the proxy is the public surface. One
llama_context holds `--parallel` sequences of `--context` tokens each; the routes are
llmup's shared worker layer (`workers.api`) over the `BatchEngine`, which decodes every
active request together, keeps each session's KV cache in a sequence between turns, and
moves the least recently used ones to a byte-bounded RAM store and then to one file per
session under `--slots-dir`. `GET /slots` reports them and `DELETE /slots` (with the proxy's
private session headers) forgets one session everywhere.

Beyond OpenAI's fields (tools, JSON replies, log probabilities, n choices, a reply to
continue) a request may carry llama.cpp's `grammar` (GBNF), `top_k`, `min_p`,
`repeat_penalty`, `min_tokens` and `mirostat_mode` / `_tau` / `_eta`; tool calls and
`response_format` json_object / json_schema become a grammar (`launcher.json_grammar`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp
from fastapi import APIRouter, FastAPI, Request

from launcher import __version__
from launcher.engines import physical_cores
from launcher.errors import BadRequestError, LlmupError
from launcher.json_grammar import ReplyGrammar, reply_grammar
from launcher.private import UMASK
from launcher.reply_format import ReplyFormatError, grammar_spec
from launcher.settings import default_home
from launcher.workers.api import LOG_FORMAT, create_worker_app, run_worker
from launcher.workers.llamacpp_slots.engine import BatchEngine
from launcher.workers.llamacpp_slots.native import (
    ContextOptions,
    ModelOptions,
    NativeContext,
    NativeModel,
    route_llama_logs,
)
from launcher.workers.llamacpp_slots.sampling import check_grammar
from launcher.workers.llamacpp_slots.slot_store import (
    KEY_FILE,
    DiskStore,
    RamStore,
    SlotStore,
    state_key,
)
from launcher.workers.llamacpp_slots.slots import SlotManager
from launcher.workers.llamacpp_slots.text import LlamaText
from launcher.workers.prepare import WorkerState, session_key
from launcher.workers.prepare import sampling_extras as checked_extras

logger = logging.getLogger(__name__)

MIB = 1 << 20
STATE_FORMAT = 1  # bump when the file layout or what identity means changes


# ---- llama.cpp's sampling extras ----------------------------------------------------------


def sampling_extras(model: NativeModel, body: Any) -> dict[str, Any]:
    """`GenerationParams` fields from a request's extras; bad ones are a 400 up front."""
    extras = checked_extras(body)
    grammar = _grammar(model, extras.grammar, body)
    return {
        **extras.params(),
        "grammar": grammar.text if grammar else None,
        "grammar_triggers": grammar.triggers if grammar else (),
        "logit_bias": _logit_bias(model, body.logit_bias),
    }


def _logit_bias(model: NativeModel, given: dict[str, float] | None) -> dict[int, float]:
    bias = {int(token): value for token, value in (given or {}).items()}
    if any(not 0 <= token < model.vocab_size for token in bias):
        raise BadRequestError(
            f"logit_bias token ids must be in [0, {model.vocab_size})", param="logit_bias"
        )
    return bias


def _grammar(model: NativeModel, grammar: str | None, body: Any) -> ReplyGrammar | None:
    """The request's own grammar, or the one its tools and JSON reply make
    (`launcher.json_grammar`); one llama.cpp cannot parse, or a schema it cannot convert, is
    a 400."""
    try:
        spec = grammar_spec(body)
        built = reply_grammar(spec) if spec is not None else None
    except ReplyFormatError as exc:
        raise BadRequestError(str(exc), param=exc.param, code="invalid_schema") from None
    if grammar is not None and built is not None:
        raise BadRequestError(
            "`grammar` cannot be combined with tool calls or a JSON response_format",
            param="grammar",
        )
    if grammar is not None:
        built = ReplyGrammar(grammar)
    if built is not None and not check_grammar(model, built.text):
        raise BadRequestError("the grammar does not parse as llama.cpp GBNF", param="grammar")
    return built


# ---- the slot routes ----------------------------------------------------------------------


@dataclass
class Slots:
    engine: BatchEngine
    manager: SlotManager
    store: SlotStore

    def snapshot(self) -> dict[str, Any]:
        """Slot figures for the proxy's /metrics (taken on the engine thread)."""
        manager, store, stats = self.manager, self.store, self.manager.stats
        disk = store.disk
        return {
            "slots": len(manager.slots),
            "in_use": manager.in_use(),
            "pinned": manager.pinned(),
            "ram_bytes": store.ram.bytes_held,
            "ram_states": len(store.ram),
            "disk_bytes": disk.bytes_held if disk else 0,
            "disk_states": len(disk) if disk else 0,
            "restores": dict(stats.restores),
            "saves": stats.saves,
            "prefix_tokens_reused": stats.reused_tokens,
            "prompt_tokens_evaluated": stats.evaluated_tokens,
            "generated_tokens": self.engine.stats.generated_tokens,
        }


slot_router = APIRouter()


def _slots(request: Request) -> Slots:
    return request.app.state.slots


@slot_router.get("/slots")
async def slot_stats(request: Request) -> dict[str, Any]:
    slots = _slots(request)
    return await asyncio.wrap_future(slots.engine.call(slots.snapshot))


@slot_router.delete("/slots")
async def forget_session(request: Request) -> dict[str, Any]:
    """Forget one session (named by the private headers): sequence, RAM and disk."""
    key = session_key(request)
    if key is None:
        raise BadRequestError("name the session with the proxy's private session headers")
    slots = _slots(request)
    held = await asyncio.wrap_future(slots.engine.call(lambda: slots.manager.forget(key)))
    return {"deleted": bool(held)}


# ---- assembling a worker ------------------------------------------------------------------


@dataclass(frozen=True)
class SlotOptions:
    folder: Path | None  # None: no disk store
    ram_bytes: int = 1024 * MIB
    disk_bytes: int = 8192 * MIB
    ttl_s: float = 7 * 86400.0


def state_identity(model_path: Path, context: ContextOptions) -> dict[str, Any]:
    """What a saved state must match to be loaded: the model file and the KV layout."""
    stat = model_path.stat()
    return {
        "format": STATE_FORMAT,
        "llama_cpp": llama_cpp.__version__,
        "model": str(model_path.resolve()),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "kv_type": context.kv_type.lower(),
        "flash_attn": context.flash_attn,
    }


def build_identity(
    model_path: Path, context: ContextOptions, model: ModelOptions
) -> dict[str, Any]:
    """What identifies this worker's build for the replies' `system_fingerprint`: the saved
    states' identity (model file, llama-cpp-python version, KV layout) and every load
    setting that can change what the model generates."""
    return {
        **state_identity(model_path, context),
        "backend": "llama.cpp-slots",
        "llmup": __version__,
        "n_ctx_seq": context.n_ctx_seq,
        "n_seq": context.n_seq,
        "n_batch": context.n_batch,
        "n_ubatch": context.n_ubatch,
        "n_gpu_layers": model.n_gpu_layers,
        "tensor_split": list(model.tensor_split),
        "repack": model.repack,
    }


def create_app(
    model: NativeModel,
    ctx: NativeContext,
    identity: dict[str, Any],
    slots: SlotOptions,
    *,
    model_alias: str,
    build: dict[str, Any] | None = None,
) -> FastAPI:
    """The worker's app over a loaded model and context; all state on `app.state`.
    `identity` is what a saved state must match; `build` what the fingerprint covers."""
    disk = None
    if slots.folder is not None:
        try:
            slots.folder.mkdir(parents=True, exist_ok=True)
            key = state_key(slots.folder / KEY_FILE)
            disk = DiskStore(
                slots.folder, identity, key=key, budget=slots.disk_bytes, ttl_s=slots.ttl_s
            )
        except OSError as exc:  # serving beats persisting: RAM only, and say so
            logger.warning("saved sessions stay in RAM only: %s", exc)
    store = SlotStore(RamStore(slots.ram_bytes), disk, ttl_s=slots.ttl_s)
    manager = SlotManager(ctx, store, n_swa=model.n_swa)
    engine = BatchEngine(model, ctx, manager)
    text = LlamaText(model)
    state = WorkerState(
        tokenizer=text,
        engine=engine,
        chat_prompt=text.chat_prompt,
        model_alias=model_alias,
        max_seq_len=ctx.n_ctx_seq,
        sampling_extras=lambda body: sampling_extras(model, body),
        identity=build or identity,
        native_tools=text.knows_tools,
        max_choices=ctx.n_seq,
        choices_limit=" (the sequences it decodes at once: `llmup serve --parallel N`)",
        logprobs=True,
        grammar=True,
    )
    app = create_worker_app(state, title="llmup llama.cpp worker", routers=(slot_router,))
    app.state.slots = Slots(engine, manager, store)
    return app


# ---- command line -------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _split(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected fractions like 0.5,0.5, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m launcher.workers.llamacpp_slots.server",
        description="llmup's OpenAI-compatible GGUF worker: session slots (each conversation's "
        "KV cache kept between turns) and continuous batching. Binds 127.0.0.1 by default: "
        "llmup's proxy is the public surface.",
    )
    add = parser.add_argument
    add("--model", type=Path, required=True, help="GGUF file")
    add("--port", type=int, required=True)
    add("--host", default="127.0.0.1")
    add("--model-alias", default=None, help="model id (default: the file's stem)")
    add("--context", type=_positive_int, default=4096, help="tokens per sequence")
    add("--parallel", type=_positive_int, default=1, help="sequences decoded together")
    add("--n-batch", type=_positive_int, default=512, help="tokens per decode step")
    add("--n-ubatch", type=_positive_int, default=512)
    add("--n-gpu-layers", type=int, default=0)
    add("--tensor-split", type=_split, default=(), help="share per GPU, e.g. 0.5,0.5")
    add("--kv-type", default="f16", choices=["f32", "f16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0"])
    add("--flash-attn", choices=["auto", "on", "off"], default="auto")
    add("--threads", type=_positive_int, default=None, help="default: physical cores")
    add("--repack", choices=["auto", "on", "off"], default="auto", help="CPU weight repacking")
    add("--slots-dir", type=Path, default=None, help="saved session states (default: HOME/slots)")
    add("--no-disk-slots", action="store_true", help="keep saved states in RAM only")
    add("--slot-ram-mib", type=int, default=1024, help="RAM for saved session states")
    add("--slot-disk-mib", type=int, default=8192, help="disk for saved session states")
    add("--slot-ttl-s", type=float, default=7 * 86400.0, help="saved states expire after")
    add("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add("--verbose", action="store_true", help="llama.cpp's debug log too")
    return parser


def model_options(args: argparse.Namespace) -> ModelOptions:
    return ModelOptions(args.model, args.n_gpu_layers, args.tensor_split, args.repack)


def load(args: argparse.Namespace) -> tuple[NativeModel, NativeContext, ContextOptions]:
    flash = {"auto": None, "on": True, "off": False}[args.flash_attn]
    model = NativeModel(model_options(args))
    options = ContextOptions(
        n_ctx_seq=args.context,
        n_seq=args.parallel,
        n_batch=args.n_batch,
        n_ubatch=args.n_ubatch,
        threads=args.threads or physical_cores(),
        kv_type=args.kv_type,
        flash_attn=flash,
    )
    try:
        return model, NativeContext(model, options), options
    except BaseException:
        model.close()
        raise


def slot_options(args: argparse.Namespace) -> SlotOptions:
    folder = None if args.no_disk_slots else (args.slots_dir or default_home() / "slots")
    return SlotOptions(folder, args.slot_ram_mib * MIB, args.slot_disk_mib * MIB, args.slot_ttl_s)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.umask(UMASK)  # it writes only saved sessions into the llmup home: private to its owner
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)
    route_llama_logs(args.verbose)
    try:
        model, ctx, options = load(args)
    except LlmupError as exc:
        logger.error("%s", exc)
        return exc.exit_code
    alias = args.model_alias or args.model.stem
    identity = state_identity(args.model, options)
    build = build_identity(args.model, options, model_options(args))
    app = create_app(model, ctx, identity, slot_options(args), model_alias=alias, build=build)
    logger.info(
        "serving %s on http://%s:%d/v1: %d sequence(s) of %d tokens",
        alias, args.host, args.port, options.n_seq, ctx.n_ctx_seq,
    )  # fmt: skip
    run_worker(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
