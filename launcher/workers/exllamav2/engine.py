"""exllamav2 behind a small `Generator` interface, for llmup's GPTQ worker.

The interface (`Generator`, with `GenerationParams` and `TokenEvent` from `generation`) and
the thread that drives one (`GenerationWorker`) are engine-agnostic: the HTTP layer in
`exllamav2.server` uses only them, so it runs on the CPU against a fake in tests.
`ExllamaGenerator` implements the interface on exllamav2's dynamic generator. torch,
exllamav2 and lm-format-enforcer (`json_filter`, the JSON filters) are imported only inside
`ExllamaGenerator.load`, after `check_runtime` has turned a missing package or GPU into one
actionable line (exit code 2), never a traceback.
"""

from __future__ import annotations

import importlib.util
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from launcher.errors import LlmupError
from launcher.workers.generation import (
    END,
    GenerationJob,
    GenerationParams,
    TokenEvent,
    TokenLogprob,
    first_line,
)
from launcher.workers.logprob_math import token_logprob

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'llmup[exllamav2]'"
# ---- startup errors -----------------------------------------------------------------------


class WorkerStartupError(LlmupError):
    """The worker cannot serve; its message is the one line the supervisor shows and parses."""


class WorkerDependencyError(WorkerStartupError):
    """torch, exllamav2 or a CUDA device is missing: an install problem, not a crash."""

    exit_code = 2


class WorkerModelError(WorkerStartupError):
    """The model directory is missing or is not an exllamav2-loadable model."""

    exit_code = 2


# ---- the generator interface --------------------------------------------------------------


class Generator(Protocol):
    """What the HTTP layer needs from a model; one implementation per engine, plus test fakes.

    `vocab_size` bounds client-supplied token ids: an id past it would fault on the GPU.
    """

    vocab_size: int

    def encode(
        self, text: str, *, bos: bool = False, eos: bool = False, special: bool = False
    ) -> list[int]:
        """Token ids of `text`; `special` parses "<s>"-style markers as control tokens."""
        ...

    def count_tokens(self, text: str) -> int:
        """Tokens in `text` as llama.cpp's /extras/tokenize/count counts them (BOS, special)."""
        ...

    def generate(
        self, prompt: list[int], params: GenerationParams, cancel: threading.Event
    ) -> Iterator[TokenEvent]:
        """Stream a completion; stops early when `cancel` is set or the iterator is closed."""
        ...


# ---- the generation thread ----------------------------------------------------------------


class GenerationWorker:
    """One thread owns the generator, so the event loop (and /health) never waits on CUDA."""

    def __init__(self, generator: Generator) -> None:
        self._generator = generator
        self._jobs: queue.Queue[GenerationJob | None] = queue.Queue()
        self._current: GenerationJob | None = None
        self._thread: threading.Thread | None = None
        self.fatal_error: str | None = None  # set once the engine can no longer generate

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="llmup-generate", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel the running and queued jobs, then let the thread end."""
        for job in [self._current, *list(self._jobs.queue)]:
            if job is not None:
                job.cancel.set()
        self._jobs.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, job: GenerationJob) -> None:
        self._jobs.put(job)

    def pending(self) -> int:
        return self._jobs.qsize() + (self._current is not None)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            self._current = job
            try:
                self._run_job(job)
            finally:
                self._current = None
                job.emit(END)

    def _run_job(self, job: GenerationJob) -> None:
        if job.cancel.is_set():
            return
        if self.fatal_error:
            job.emit(RuntimeError(f"engine unusable after: {self.fatal_error}"))
            return
        try:
            self._stream(job)
        except Exception as exc:
            logger.exception("generation failed")
            if is_fatal(exc):
                self.fatal_error = first_line(exc)
                logger.error("engine failed for good; restart the worker: %s", self.fatal_error)
            job.emit(exc)

    def _stream(self, job: GenerationJob) -> None:
        """Each choice in turn (choice i seeded seed + i), its events forwarded until its end,
        a stop or a cancel; closing the iterator ends the engine job. exllamav2's page cache
        keeps the prompt's pages, so a later choice finds its prompt already evaluated."""
        seed = job.params.seed
        for choice in range(job.params.n):
            if job.cancel.is_set():
                return
            params = replace(job.params, n=1, seed=None if seed is None else seed + choice)
            events = self._generator.generate(job.prompt, params, job.cancel)
            try:
                for event in events:
                    if job.ended(choice):
                        break
                    job.emit(replace(event, choice=choice))
            finally:
                close = getattr(events, "close", None)
                if close is not None:
                    close()


# ---- the exllamav2 generator --------------------------------------------------------------

_CACHE_CLASSES = {
    "FP16": "ExLlamaV2Cache",
    "Q8": "ExLlamaV2Cache_Q8",
    "Q6": "ExLlamaV2Cache_Q6",
    "Q4": "ExLlamaV2Cache_Q4",
}
_PAGE_SIZE = 256  # the dynamic generator wants the cache length in whole 256-token pages


@dataclass(frozen=True)
class LoadOptions:
    model_dir: Path
    max_seq_len: int = 4096
    cache_mode: str = "FP16"
    gpu_split: list[float] | None = None  # GiB per GPU, weights + buffers; None: autosplit


def is_fatal(exc: BaseException) -> bool:
    """A CUDA fault (illegal access, device-side assert) poisons the context for good: the
    process must be restarted. An out-of-memory error on one request is not fatal."""
    text = str(exc)
    return "CUDA error" in text and "out of memory" not in text


def check_runtime() -> None:
    """Fail with one actionable line before an import deep in exllamav2 fails with a traceback."""
    needed = ("torch", "exllamav2", "lmformatenforcer")
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        names = ", ".join(repr(name) for name in missing)
        raise WorkerDependencyError(
            f"missing dependency: No module named {names}; the exllamav2 backend needs torch, "
            f"exllamav2 and lm-format-enforcer: {INSTALL_HINT}"
        )
    import torch

    if not torch.cuda.is_available():
        raise WorkerDependencyError(
            f"missing dependency: no CUDA device visible to torch {torch.__version__} (CUDA "
            f"build: {torch.version.cuda or 'none'}); exllamav2 needs an NVIDIA GPU and a CUDA "
            f"build of torch: check nvidia-smi and CUDA_VISIBLE_DEVICES, then {INSTALL_HINT}"
        )
    try:
        import exllamav2  # noqa: F401
    except Exception as exc:
        raise WorkerDependencyError(
            f"missing dependency: exllamav2 failed to import ({first_line(exc)}); reinstall it "
            f"for this torch and CUDA: {INSTALL_HINT}"
        ) from exc


def check_model_dir(model_dir: Path) -> None:
    if not (model_dir / "config.json").is_file():
        raise WorkerModelError(
            f"model directory {model_dir} has no config.json; pass the folder of a GPTQ or EXL2 "
            "model (llmup pull puts it in the llmup home)"
        )


def _progress_logger(model_dir: Path) -> Callable[[int, int], None]:
    """exllamav2 reports each loaded module; log every tenth, for the supervisor's progress line."""
    step = {"next": 0}

    def report(done: int, total: int) -> None:
        percent = 100 * done // max(total, 1)
        if percent >= step["next"]:
            logger.info("loading %s: %d%% (%d/%d modules)", model_dir.name, percent, done, total)
            step["next"] = percent + 10

    return report


def _load_model(exl: Any, model: Any, options: LoadOptions, cache_len: int) -> Any:
    """Manual split when the plan gives one (cache follows the layers), else autosplit."""
    cache_class = getattr(exl, _CACHE_CLASSES[options.cache_mode])
    progress = _progress_logger(options.model_dir)
    if options.gpu_split:
        model.load(gpu_split=options.gpu_split, callback=progress)
        return cache_class(model, max_seq_len=cache_len)
    cache = cache_class(model, max_seq_len=cache_len, lazy=True)
    model.load_autosplit(cache, callback=progress)
    return cache


def _paged_attention(config: Any) -> bool:
    """Paged (batched) attention needs flash-attn >= 2.5.7; without it run unpaged, batch 1."""
    from exllamav2 import attn

    return bool(getattr(attn, "has_flash_attn_with_paged", False)) and not config.no_flash_attn


class ExllamaGenerator:
    """`Generator` on exllamav2's dynamic generator: one job at a time, EOS-terminated."""

    def __init__(self, engine: Any, tokenizer: Any, modules: dict[str, Any]) -> None:
        self._engine = engine
        self._tokenizer = tokenizer
        self.vocab_size = int(tokenizer.get_vocab_size())
        self._modules = modules  # torch, ExLlamaV2DynamicJob, ExLlamaV2Sampler, json_filter
        self._pieces: list[str] | None = None
        self._token_data: Any = None  # the JSON filters' view of the vocabulary, built once

    @classmethod
    def load(cls, options: LoadOptions) -> ExllamaGenerator:
        """Check the runtime, load weights and cache on the GPUs, build the dynamic generator."""
        check_runtime()
        check_model_dir(options.model_dir)
        try:
            return cls._load(options)
        except WorkerStartupError:
            raise
        except Exception as exc:
            logger.debug("load failed", exc_info=True)
            raise _load_error(options, exc) from exc

    @classmethod
    def _load(cls, options: LoadOptions) -> ExllamaGenerator:
        import exllamav2 as exl
        import torch
        from exllamav2.generator import (
            ExLlamaV2DynamicGenerator,
            ExLlamaV2DynamicJob,
            ExLlamaV2Sampler,
        )

        from launcher.workers.exllamav2 import json_filter

        config = exl.ExLlamaV2Config(str(options.model_dir))
        cache_len = -(-options.max_seq_len // _PAGE_SIZE) * _PAGE_SIZE
        config.max_seq_len = cache_len
        # load_autosplit clamps this itself; a manual split must not size buffers beyond it
        config.max_input_len = min(config.max_input_len, cache_len)
        if hasattr(config, "arch_compat_overrides"):
            config.arch_compat_overrides()
        model = exl.ExLlamaV2(config)
        cache = _load_model(exl, model, options, cache_len)
        tokenizer = exl.ExLlamaV2Tokenizer(config)
        engine = ExLlamaV2DynamicGenerator(
            model=model,
            cache=cache,
            tokenizer=tokenizer,
            max_batch_size=1,
            paged=_paged_attention(config),
        )
        modules = {
            "torch": torch,
            "job": ExLlamaV2DynamicJob,
            "sampler": ExLlamaV2Sampler,
            "json_filter": json_filter,
        }
        logger.info(
            "loaded %s (cache %s, %d tokens)", options.model_dir, options.cache_mode, cache_len
        )
        return cls(engine, tokenizer, modules)

    def encode(
        self, text: str, *, bos: bool = False, eos: bool = False, special: bool = False
    ) -> list[int]:
        ids = self._tokenizer.encode(text, add_bos=bos, add_eos=eos, encode_special_tokens=special)
        return ids[0].tolist()

    def count_tokens(self, text: str) -> int:
        return len(self.encode(text, bos=True, special=True))

    def generate(
        self, prompt: list[int], params: GenerationParams, cancel: threading.Event
    ) -> Iterator[TokenEvent]:
        """Drive the dynamic generator; closing the iterator or `cancel` removes the job."""
        job = self._job(prompt, params)
        self._engine.enqueue(job)
        emitted, finished = 0, False
        try:
            while not finished and not cancel.is_set():
                for result in self._engine.iterate():
                    if result.get("job") is not job or result.get("stage") != "streaming":
                        continue
                    event = _event_from_result(result, emitted)
                    if params.logprobs is not None:
                        event = replace(event, logprobs=self._logprobs(result, params.logprobs))
                    emitted += event.tokens
                    finished = event.finish_reason is not None
                    yield event
        finally:
            if not finished:
                self._cancel(job)

    def _cancel(self, job: Any) -> None:
        """Free the job's cache pages; after a CUDA fault this may fail too, and must not hide
        the original error."""
        try:
            self._engine.cancel(job)
        except Exception:
            logger.warning("could not cancel the generation job", exc_info=True)

    def _job(self, prompt: list[int], params: GenerationParams) -> Any:
        """The dynamic job: `min_new_tokens` holds off the stop tokens (min_tokens), the
        logits come back with the tokens when log probabilities are asked for, and a JSON
        reply gets its filter (ended by EOS as soon as the JSON is complete)."""
        torch = self._modules["torch"]
        filters = self._filters(params)
        return self._modules["job"](
            input_ids=torch.tensor([prompt], dtype=torch.long),
            max_new_tokens=params.max_new_tokens,
            min_new_tokens=params.min_tokens,
            gen_settings=self._sampler_settings(params),
            seed=params.seed,
            stop_conditions=[self._tokenizer.eos_token_id],
            decode_special_tokens=False,
            return_logits=params.logprobs is not None,
            filters=filters,
            filter_prefer_eos=bool(filters),
        )

    def _filters(self, params: GenerationParams) -> list[Any]:
        """The request's JSON filter (`json_filter.ReplyFilter`), or none."""
        if params.reply is None:
            return []
        json_filter = self._modules["json_filter"]
        if self._token_data is None:
            self._token_data = json_filter.tokenizer_data(self._vocabulary(json_filter))
        return [json_filter.ReplyFilter(self._token_data, json_filter.reply_parser(params.reply))]

    def _vocabulary(self, json_filter: Any) -> Any:
        """Each token's text, and the ids that are not text (exllamav2's added tokens and
        BOS / EOS / PAD / UNK), as lm-format-enforcer's own exllamav2 integration reads them."""
        tok = self._tokenizer
        ids = (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id)
        special = {*tok.extended_id_to_piece, *(i for i in ids if i is not None)}
        return json_filter.Vocabulary(
            tok.get_id_to_piece_list(False), tok.eos_token_id, frozenset(special)
        )

    def _sampler_settings(self, params: GenerationParams) -> Any:
        """OpenAI semantics: no repetition penalty or top-k unless asked; 0 means greedy;
        llama.cpp's top_k, min_p, repeat_penalty and mirostat (exllamav2's is mirostat 2)."""
        settings = self._modules["sampler"].Settings()
        settings.token_repetition_penalty = params.repeat_penalty
        settings.temperature = params.temperature or 1.0
        settings.top_p = params.top_p
        greedy = params.temperature == 0 or params.top_p == 0
        settings.top_k = 1 if greedy else params.top_k
        settings.min_p = params.min_p
        settings.token_presence_penalty = params.presence_penalty
        settings.token_frequency_penalty = params.frequency_penalty
        if params.mirostat and not greedy:
            settings.mirostat = True
            settings.mirostat_tau, settings.mirostat_eta = params.mirostat_tau, params.mirostat_eta
        return settings

    def _logprobs(self, result: dict[str, Any], top: int) -> tuple[TokenLogprob, ...]:
        """Each token's log probability from the pre-sampling logits the job returned."""
        logits, ids = result.get("logits"), result.get("token_ids")
        if logits is None or ids is None:
            return ()
        rows = logits.float().cpu().numpy()
        rows = rows.reshape(-1, rows.shape[-1])
        tokens = [int(t) for t in ids.reshape(-1).tolist()]
        return tuple(token_logprob(rows[i], t, top, self._text) for i, t in enumerate(tokens))

    def _text(self, token: int) -> tuple[str, tuple[int, ...]]:
        pieces = self._pieces or self._tokenizer.get_id_to_piece_list(True)
        self._pieces = pieces
        text = pieces[token] if 0 <= token < len(pieces) else ""
        return text, tuple(text.encode("utf-8"))


def _event_from_result(result: dict[str, Any], emitted: int) -> TokenEvent:
    """One dynamic-generator result as a TokenEvent; the final one settles the token count."""
    text = result.get("text", "")
    ids = result.get("token_ids")
    count = int(ids.shape[-1]) if ids is not None else 0
    if not result.get("eos"):
        return TokenEvent(text, count)
    reason = result.get("eos_reason")
    total = int(result.get("new_tokens", emitted + count)) - (reason == "stop_token")
    finish = "length" if reason == "max_new_tokens" else "stop"
    return TokenEvent(text, max(total - emitted, 0), finish)


def _load_error(options: LoadOptions, exc: Exception) -> WorkerStartupError:
    """One line the supervisor can classify: out of memory versus a bad model folder."""
    detail = first_line(exc)
    if "out of memory" in detail.lower() or type(exc).__name__ == "OutOfMemoryError":
        return WorkerStartupError(
            f"out of memory loading {options.model_dir} (cache {options.cache_mode}, "
            f"{options.max_seq_len} tokens, split {options.gpu_split or 'auto'}): {detail}"
        )
    return WorkerModelError(f"failed to load model from {options.model_dir}: {detail}")
