"""The llama.cpp backend: llama-cpp-python's OpenAI server, launched with the plan's settings.

The command runs `launcher.workers.llamacpp_python.server`: `llama_cpp.server`'s app and flags, plus
a `/health` route that answers while a generation holds the model, the per-run backend key,
and weight repacking turned off on AMX CPUs (there this llama.cpp build segfaults on the first
token of a quantized model: measured here with a Q8_0 model, exit -11 under plain
llama_cpp.server, answers under the worker). The common parts of the launch (host, port,
environment, key) are `launch.backend_spec`'s.

Flags checked against `python -m llama_cpp.server --help` of llama-cpp-python 0.3.36, whose
defaults differ from what a plan assumes in ways that matter:

- n_threads defaults to half the logical CPUs, which halves prompt speed on small machines;
  llmup passes all physical cores for generation and prompt processing.
- flash_attn is a bool defaulting to False (llama.cpp's "disabled", not its "auto"); the plan
  says on or off and llmup passes exactly that.
- logits_all defaults to True, which keeps n_ctx x n_vocab float scores on the host (500 MiB
  for Llama-2 at 4096) that the memory model does not count; llmup passes false (the cost:
  no prompt logprobs in /v1/completions).
- use_mlock defaults to True where supported, pinning the whole mapped model; llmup passes
  false, llama.cpp's own default.
- interrupt_requests defaults to True: a waiting request cuts a running stream short with
  [DONE]; llmup passes false so concurrent requests queue instead.
- cache is never enabled: each cached state also holds its prompt's logits outside the
  cache's size accounting (the server was OOM-killed at 24 GB RSS in a measurement).

Every setting the server does not get as a flag it reads from the environment (pydantic
settings, case-insensitive: MODEL, CACHE, API_KEY...; HOST and PORT even override the flags),
so the spec removes those names from the inherited environment.
"""

from __future__ import annotations

import logging
from pathlib import Path

from launcher.backends.spec import WorkerLaunch
from launcher.catalog.gguf_file import open_gguf, shard_paths
from launcher.engines import kv_type_id, physical_cores
from launcher.errors import ModelFileError
from launcher.planning.plan import Plan

log = logging.getLogger(__name__)

READY_BASE_S = 30.0
READY_PER_GB_S = 10.0
SERVER_MODULE = "launcher.workers.llamacpp_python.server"
FALLBACK_CHAT_FORMAT = "llama-2"

# Every llama_cpp.server 0.3.36 setting (ModelSettings + ServerSettings) plus the names its
# __main__ reads itself; none may leak in from the user's environment.
SERVER_ENV_NAMES = frozenset(
    """model model_alias n_gpu_layers split_mode main_gpu tensor_split vocab_only use_mmap
    use_mlock kv_overrides rpc_servers seed n_ctx n_batch n_ubatch n_threads n_threads_batch
    rope_scaling_type rope_freq_base rope_freq_scale yarn_ext_factor yarn_attn_factor
    yarn_beta_fast yarn_beta_slow yarn_orig_ctx mul_mat_q logits_all embedding offload_kqv
    flash_attn last_n_tokens_size lora_base lora_path numa chat_format chat_template_kwargs
    clip_model_path cache cache_type cache_size hf_tokenizer_config_path
    hf_pretrained_model_name_or_path hf_model_repo_id draft_model draft_model_num_pred_tokens
    type_k type_v verbose host port ssl_keyfile ssl_certfile api_key interrupt_requests
    disable_ping_events root_path config_file models""".upper().split()
)


def launch(
    plan: Plan, model_path: Path, *, threads: int | None = None, chat_format: str | None = None
) -> WorkerLaunch:
    """The worker's part of the launch: llama_cpp.server's flags for `model_path` as planned.

    `threads` None uses every physical core; `chat_format` None takes the GGUF's own chat
    template when it has one, else the plan's format (llama-2 for the catalog's models).
    """
    if not model_path.is_file():
        raise ModelFileError(f"model file {model_path} does not exist; run `llmup pull` first")
    args = server_args(
        plan,
        model_path,
        threads=threads or physical_cores(),
        chat_format=chat_format or chat_format_flag(plan, model_path),
    )
    return WorkerLaunch(
        name="llama.cpp",
        module=SERVER_MODULE,
        args=args,
        ready_timeout_s=ready_timeout_s(model_bytes(model_path)),
        log_stem="llamacpp",
        env_unset=SERVER_ENV_NAMES,
    )


def server_args(
    plan: Plan, model_path: Path, *, threads: int, chat_format: str | None
) -> list[str]:
    """The server's command-line flags for a plan (every value explicit, never --cache);
    --host and --port are the common launch's."""
    s, placement = plan.settings, plan.placement
    args = [
        "--model", str(model_path),
        "--model_alias", plan.model.id,
        "--n_ctx", str(plan.context),
        "--n_batch", str(s.n_batch),
        "--n_ubatch", str(s.n_ubatch),
        "--n_gpu_layers", str(placement.n_gpu_layers),
        "--type_k", str(kv_type_id(s.kv_cache_type)),
        "--type_v", str(kv_type_id(s.kv_cache_type)),
        "--flash_attn", _flag(s.flash_attn),
        "--n_threads", str(threads),
        "--n_threads_batch", str(threads),
        "--cache", "false",
        "--logits_all", "false",
        "--use_mlock", "false",
        "--interrupt_requests", "false",
        "--verbose", "true",
    ]  # fmt: skip
    if len(placement.devices) > 1:
        args += ["--tensor_split", *(str(x) for x in placement.tensor_split)]
    if chat_format:
        args += ["--chat_format", chat_format]
    return args


def chat_format_flag(plan: Plan, model_path: Path) -> str | None:
    """None (let llama-cpp-python use the GGUF's template) or the format to pass.

    With a `tokenizer.chat_template` in the file, llama-cpp-python guesses a known format
    from it or renders the template itself; without one it would fall back to llama-2, and
    llmup says so explicitly, or passes the plan's own format. A plan of a local file knows
    already (its header was read at planning); only a downloaded file is read here.
    """
    has_template = plan.model.gguf_chat_template
    if has_template is None:
        has_template = bool(gguf_chat_template(model_path))
    if has_template:
        return None
    return plan.model.chat_format or FALLBACK_CHAT_FORMAT


def gguf_chat_template(path: Path) -> str | None:
    """The file's `tokenizer.chat_template`, None when absent or the file is unreadable
    (an unreadable file fails at load, where the supervisor classifies it)."""
    try:
        field = open_gguf(path).get_field("tokenizer.chat_template")
        return field.contents() if field is not None else None
    except (OSError, ValueError, IndexError, KeyError, TypeError) as exc:
        log.debug("cannot read the chat template of %s: %s", path, exc)
        return None


def model_bytes(path: Path) -> int:
    """Size of the model, all shards of a gguf-split set counted."""
    return sum(p.stat().st_size for p in shard_paths(path) if p.exists())


def ready_timeout_s(size_bytes: int) -> float:
    """30 s plus 10 s per GB: reading weights from a slow disk dominates a load."""
    return READY_BASE_S + READY_PER_GB_S * size_bytes / 1e9


def _flag(value: bool) -> str:
    return "true" if value else "false"
