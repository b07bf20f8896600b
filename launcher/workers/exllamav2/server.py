"""llmup's HTTP worker for GPTQ models: exllamav2's dynamic generator behind OpenAI routes.

exllamav2 ships no OpenAI server, so this module is one. It is started by the supervisor as
``python -m launcher.workers.exllamav2.server --model-dir DIR --port N`` on 127.0.0.1; the
proxy is the public surface, and the worker answers only requests that carry the run's
backend key (`backend_key`). Argument parsing and ``--help`` never import torch or exllamav2,
and a missing package or GPU ends the process with exit code 2 and one log line that says what
to install, so the supervisor can classify the failure as a missing dependency.

The routes are llmup's shared worker layer (`workers.api`) over the small `Generator`
interface of `exllamav2.engine`, so tests drive it on the CPU with a fake. What exllamav2 can
do of the OpenAI surface it does: n choices (one after another, the prompt's pages cached),
log probabilities (from the logits a job returns), a reply to continue, `min_tokens`,
`top_k`, `min_p`, `repeat_penalty`, mirostat 2, and replies held to a JSON schema:
`response_format` `json_object` / `json_schema` (on chat and text completions) and a forced
tool call (`tool_choice` `required` or a named function), through exllamav2's sampling
filters and lm-format-enforcer (`exllamav2.json_filter`; a schema it cannot build is a 400
naming the part, `exllamav2.json_schemas`). It has no GBNF grammar and no lazy grammar, so
`grammar`, `logit_bias` and tools the model may call or not (`tool_choice` `auto`) are a
400 that names `--backend llama.cpp`. Generation runs on
one worker thread that owns the model: requests are served one at a time in arrival order
(the dynamic generator's batching is not used; one job keeps cancellation, errors and memory
per request simple, and the proxy bounds its own queue).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import sys
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from launcher import __version__
from launcher.engines import CACHE_MODES
from launcher.errors import BadRequestError
from launcher.reply_format import GrammarSpec, ReplyFormatError, grammar_spec
from launcher.workers.api import create_worker_app, run_worker
from launcher.workers.exllamav2.engine import (
    ExllamaGenerator,
    GenerationWorker,
    Generator,
    LoadOptions,
    WorkerStartupError,
)
from launcher.workers.exllamav2.json_schemas import check_schema, normalized
from launcher.workers.llama2_chat import prompt_tokens
from launcher.workers.logs import LOG_FORMAT
from launcher.workers.prepare import WorkerState
from launcher.workers.prepare import sampling_extras as checked_extras

logger = logging.getLogger(__name__)


MAX_CHOICES = 8  # choices run one after another; more is a long wait for one request
LLAMA_CPP = "serve a GGUF model with `--backend llama.cpp`"


def sampling_extras(body: Any) -> dict[str, Any]:
    """llama.cpp's extras that exllamav2's sampler has (top_k, min_p, repeat_penalty,
    min_tokens, mirostat 2) and the JSON the reply must be (`reply_spec`); a grammar or a
    logit bias, which it cannot apply, is a 400 naming the backend that can."""
    extras = checked_extras(body)
    if extras.grammar is not None:
        raise BadRequestError(f"`grammar` needs llama.cpp: {LLAMA_CPP}", param="grammar")
    if body.logit_bias:
        raise BadRequestError(f"`logit_bias` needs llama.cpp: {LLAMA_CPP}", param="logit_bias")
    if extras.mirostat_mode == 1:
        raise BadRequestError(
            "exllamav2 has mirostat 2 only (`mirostat_mode: 2`)", param="mirostat_mode"
        )
    return {**extras.params(), "reply": reply_spec(body)}


def reply_spec(body: Any) -> GrammarSpec | None:
    """What the reply must follow, its schemas checked against what the JSON filter builds;
    tools the model may call or not need a lazy grammar, which exllamav2 has not."""
    try:
        spec = grammar_spec(body)
        if spec is None:
            return None
        if spec.tools and not spec.forced:
            field = "functions" if getattr(body, "functions", None) else "tools"
            raise ReplyFormatError(
                f"`{field}` the model may call or not (`tool_choice` `auto`) need a grammar "
                f"that waits for a call, which exllamav2 has not: force a call (`tool_choice` "
                f"`required` or a named function), or {LLAMA_CPP}",
                field,
            )
        for tool in spec.tools:
            check_schema(normalized(tool.parameters), tool.param)
        if spec.json is not None and spec.json.schema is not None:
            check_schema(normalized(spec.json.schema), spec.json.param, strict=spec.json.strict)
    except ReplyFormatError as exc:
        raise BadRequestError(str(exc), param=exc.param) from None
    return spec


def create_app(
    generator: Generator,
    *,
    model_alias: str,
    max_seq_len: int,
    identity: dict[str, Any] | None = None,
) -> FastAPI:
    """The worker's FastAPI app; all state lives on `app.state`, so tests build their own."""
    state = WorkerState(
        tokenizer=generator,
        engine=GenerationWorker(generator),
        chat_prompt=lambda turns: prompt_tokens(
            generator.encode, turns.messages, prefill=turns.prefill
        ),
        model_alias=model_alias,
        max_seq_len=max_seq_len,
        identity=identity or {"backend": "exllamav2", "model": model_alias},
        sampling_extras=sampling_extras,
        max_choices=MAX_CHOICES,
        logprobs=True,
        grammar=True,  # JSON replies and forced calls, by filter (`reply_spec` refuses the rest)
    )
    return create_worker_app(state, title="llmup exllamav2 worker")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def build_identity(options: LoadOptions) -> dict[str, Any]:
    """What identifies this worker's build for the replies' `system_fingerprint`: exllamav2's
    and torch's versions, the model folder's weight and config files (name, size, mtime) and
    the load settings."""
    folder = options.model_dir.resolve()
    files = sorted(p for p in folder.iterdir() if p.suffix in (".json", ".safetensors"))
    return {
        "backend": "exllamav2",
        "llmup": __version__,
        "exllamav2": _version("exllamav2"),
        "torch": _version("torch"),
        "model": str(folder),
        "files": [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files],
        "max_seq_len": options.max_seq_len,
        "cache_mode": options.cache_mode,
        "gpu_split": options.gpu_split,
    }


# ---- command line -------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number 0-65535, got {text}")
    return value


def _gpu_split(text: str) -> list[float]:
    try:
        split = [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected GiB per GPU like 20,24, got {text!r}") from None
    if not split or any(value <= 0 for value in split):
        raise argparse.ArgumentTypeError(f"every GPU share must be positive, got {text!r}")
    return split


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m launcher.workers.exllamav2.server",
        description="OpenAI-compatible worker serving a GPTQ Llama-2 with exllamav2. It binds "
        "127.0.0.1 by default: llmup's proxy is the public surface.",
    )
    parser.add_argument("--model-dir", type=Path, required=True, help="GPTQ model folder")
    parser.add_argument("--port", type=_port, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--max-seq-len", type=_positive_int, default=4096, help="context tokens")
    parser.add_argument(
        "--cache-mode", type=str.upper, choices=CACHE_MODES, default="FP16", help="KV cache type"
    )
    parser.add_argument(
        "--gpu-split",
        type=_gpu_split,
        default=None,
        help="exllamav2 gpu_split: GiB per GPU for weights and fixed buffers (not the cache), "
        "e.g. 20,24 (default: autosplit, cache included)",
    )
    parser.add_argument("--model-alias", default=None, help="model id (default: repo name)")
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    return parser


def default_alias(model_dir: Path) -> str:
    """The repo name for a hub snapshot (…/models--org--name/snapshots/<sha>), else the folder."""
    path = model_dir.resolve()
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return path.parent.parent.name.split("--")[-1]
    return path.name


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)
    options = LoadOptions(args.model_dir, args.max_seq_len, args.cache_mode, args.gpu_split)
    try:
        generator = ExllamaGenerator.load(options)
    except WorkerStartupError as exc:
        logger.error("%s", exc)
        return exc.exit_code
    alias = args.model_alias or default_alias(args.model_dir)
    app = create_app(
        generator,
        model_alias=alias,
        max_seq_len=args.max_seq_len,
        identity=build_identity(options),
    )
    logger.info("serving %s on http://%s:%d/v1", alias, args.host, args.port)
    run_worker(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
