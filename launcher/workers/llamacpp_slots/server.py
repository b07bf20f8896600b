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

This module is the command line and the load, and imports nothing of HTTP: `main` starts
llama.cpp's load on a thread (C code, off the GIL) and imports the HTTP app (`app`: FastAPI,
uvicorn, pydantic's models; about as long as loading a small model) while it runs.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import threading
from concurrent.futures import Future
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import llama_cpp

from launcher import __version__
from launcher.engines import physical_cores
from launcher.errors import LlmupError
from launcher.private import UMASK, default_home
from launcher.workers.llamacpp_slots.native import (
    ContextOptions,
    ModelOptions,
    NativeContext,
    NativeModel,
    route_llama_logs,
)
from launcher.workers.logs import LOG_FORMAT

logger = logging.getLogger(__name__)

MIB = 1 << 20
STATE_FORMAT = 1  # bump when the file layout or what identity means changes


# ---- what a saved state and the fingerprint identify ----------------------------------------


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
    add(
        "--initial-parallel", type=_positive_int, default=None,
        help="sequences to start with (default: --parallel); the KV cache grows to --parallel "
        "on a low-priority thread once the worker serves",
    )  # fmt: skip
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


def initial_options(args: argparse.Namespace, options: ContextOptions) -> ContextOptions:
    """The context to start serving from: `--initial-parallel` of the planned sequences."""
    first = min(args.initial_parallel or options.n_seq, options.n_seq)
    return replace(options, n_seq=first)


def load(args: argparse.Namespace) -> tuple[NativeModel, NativeContext, ContextOptions]:
    """The model and its first context; the options are the planned (full) context's."""
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
        return model, NativeContext(model, initial_options(args, options)), options
    except BaseException:
        model.close()
        raise


def slot_options(args: argparse.Namespace) -> SlotOptions:
    folder = None if args.no_disk_slots else (args.slots_dir or default_home() / "slots")
    return SlotOptions(folder, args.slot_ram_mib * MIB, args.slot_disk_mib * MIB, args.slot_ttl_s)


APP_MODULE = "launcher.workers.llamacpp_slots.app"
HTTP_MODULE = "launcher.workers.api"


def load_in_background(args: argparse.Namespace) -> Future:
    """`load(args)` on its own thread; the future holds its result or its exception."""
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(load(args))
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=run, name="llmup-load", daemon=True).start()
    return future


def http_layer() -> tuple[ModuleType, ModuleType]:
    """The app module and the shared HTTP layer, imported only now: while the model loads."""
    return importlib.import_module(APP_MODULE), importlib.import_module(HTTP_MODULE)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.umask(UMASK)  # it writes only saved sessions into the llmup home: private to its owner
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)
    route_llama_logs(args.verbose)
    loading = load_in_background(args)
    app_module, http = http_layer()
    try:
        model, ctx, options = loading.result()
    except LlmupError as exc:
        logger.error("%s", exc)
        return exc.exit_code
    alias = args.model_alias or args.model.stem
    identity = state_identity(args.model, options)
    build = build_identity(args.model, options, model_options(args))
    app = app_module.create_app(
        model, ctx, identity, slot_options(args), model_alias=alias, build=build,
        planned_seqs=options.n_seq,
    )  # fmt: skip
    if ctx.n_seq < options.n_seq:
        app.state.slots.engine.grow_later(lambda: NativeContext(model, options))
    logger.info(
        "serving %s on http://%s:%d/v1: %d sequence(s) of %d tokens (%d planned)",
        alias, args.host, args.port, ctx.n_seq, ctx.n_ctx_seq, options.n_seq,
    )  # fmt: skip
    http.run_worker(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
