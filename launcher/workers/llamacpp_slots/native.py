"""llama.cpp's C API (through llama-cpp-python's ctypes bindings) as three small objects.

`NativeModel` is the loaded GGUF and its vocabulary, `NativeContext` one llama_context whose
KV cache holds `n_seq` independent sequences of `n_ctx_seq` tokens each (llama.cpp's
non-unified KV: `n_ctx = n_ctx_seq x n_seq`, each sequence its own slice), and `Batch` one
reusable llama_batch. The session-slot worker builds everything else on these; nothing here
knows about sessions or HTTP. Every call is made from one thread (the engine's).

llama-cpp-python's own `Llama` class keeps one sequence and its `_internals` wrappers have no
sequence state calls, hence this module; it stays a thin layer over `llama_cpp.llama_cpp`.
"""

from __future__ import annotations

import ctypes
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import llama_cpp.llama_cpp as lib

from launcher.engines import kv_type_id
from launcher.errors import LlmupError, ModelFileError
from launcher.workers.repack import cpu_has_amx, repack_enabled

logger = logging.getLogger(__name__)

# ggml_log_level (ggml.h): NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5 (continues a line).
# llama-cpp-python's own log callback still maps the older order (DEBUG 4), measured here:
# "create_tensor" lines come at 1, "print_info" lines at 2.
_LOG_DEBUG, _LOG_CONT = 1, 5


class DecodeError(LlmupError):
    """llama_decode failed; the sequences in that batch no longer hold what was recorded."""


# ---- llama.cpp's own log ------------------------------------------------------------------


class _LogRoute:
    """llama.cpp's log on stderr, where the supervisor keeps it (calibration reads the load
    lines from there); debug lines only when verbose. The callback must outlive every call."""

    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose
        self._last_level = 2
        self.callback = lib.llama_log_callback(self._write)

    def _write(self, level: int, text: bytes, _user: ctypes.c_void_p) -> None:
        effective = self._last_level if level == _LOG_CONT else level
        self._last_level = effective
        if effective != _LOG_DEBUG or self.verbose:
            sys.stderr.write(text.decode("utf-8", errors="replace"))
            sys.stderr.flush()


_log_route: _LogRoute | None = None


def route_llama_logs(verbose: bool = False) -> None:
    """Install (once per process) the log callback; later calls only change verbosity."""
    global _log_route
    if _log_route is None:
        _log_route = _LogRoute(verbose)
        lib.llama_log_set(_log_route.callback, ctypes.c_void_p(0))
    _log_route.verbose = verbose


# ---- the model ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelOptions:
    path: Path
    n_gpu_layers: int = 0
    tensor_split: tuple[float, ...] = ()
    repack: str = "auto"  # weight repacking: auto (off on AMX CPUs), on, off


class NativeModel:
    """A loaded GGUF: weights, vocabulary, metadata."""

    def __init__(self, options: ModelOptions) -> None:
        path = Path(options.path)
        if not path.is_file():
            raise ModelFileError(f"model file {path} does not exist")
        params = lib.llama_model_default_params()
        params.n_gpu_layers = options.n_gpu_layers
        params.use_extra_bufts = repack_enabled(options.repack, amx=cpu_has_amx())
        self._split = None
        if options.tensor_split:
            self._split = (ctypes.c_float * len(options.tensor_split))(*options.tensor_split)
            params.tensor_split = self._split
        model = lib.llama_model_load_from_file(str(path).encode("utf-8"), params)
        if not model:
            raise ModelFileError(f"llama.cpp failed to load model from {path}")
        self.ptr = model
        self.vocab = lib.llama_model_get_vocab(model)
        self.vocab_size = lib.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train = lib.llama_model_n_ctx_train(model)
        self.bos = lib.llama_vocab_bos(self.vocab)
        self.eos = lib.llama_vocab_eos(self.vocab)
        self.adds_bos = bool(lib.llama_vocab_get_add_bos(self.vocab))
        self.n_swa = lib.llama_model_n_swa(model)  # sliding attention window, 0 when none

    def close(self) -> None:
        if self.ptr:
            lib.llama_model_free(self.ptr)
            self.ptr = None

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        data = text.encode("utf-8")
        size = len(data) + 8
        while True:
            buf = (lib.llama_token * size)()
            n = lib.llama_tokenize(
                self.vocab, data, len(data), buf, size, add_special, parse_special
            )
            if n >= 0:
                return list(buf[:n])
            size = -n

    def piece(self, token: int) -> bytes:
        """The bytes of one token as text (control tokens render as nothing)."""
        size = 64
        while True:
            buf = ctypes.create_string_buffer(size)
            n = lib.llama_token_to_piece(self.vocab, token, buf, size, 0, False)
            if n >= 0:
                return buf.raw[:n]
            size = -n

    def token_text(self, token: int) -> str:
        """The vocabulary entry itself ("<s>", "<end_of_turn>"), as chat templates name it."""
        if token < 0:
            return ""
        return lib.llama_vocab_get_text(self.vocab, token).decode("utf-8", errors="replace")

    def is_end(self, token: int) -> bool:
        """End of generation: EOS, end-of-turn and the like."""
        return bool(lib.llama_vocab_is_eog(self.vocab, token))

    def meta(self, key: str) -> str | None:
        """A GGUF metadata value as text, None when absent."""
        size = 4096
        while True:
            buf = ctypes.create_string_buffer(size)
            n = lib.llama_model_meta_val_str(self.ptr, key.encode("utf-8"), buf, size)
            if n < 0:
                return None
            if n < size:
                return buf.value.decode("utf-8", errors="replace")
            size = n + 1


# ---- the context: n_seq sequences in one KV cache -----------------------------------------

FLASH_ATTN = {None: -1, False: 0, True: 1}  # llama_flash_attn_type: auto, disabled, enabled


@dataclass(frozen=True)
class ContextOptions:
    n_ctx_seq: int  # tokens each sequence may hold
    n_seq: int = 1
    n_batch: int = 512
    n_ubatch: int = 512
    threads: int = 1
    kv_type: str = "f16"
    flash_attn: bool | None = None  # None: llama.cpp decides


class NativeContext:
    """One llama_context; every sequence id is in [0, n_seq)."""

    def __init__(self, model: NativeModel, options: ContextOptions) -> None:
        params = lib.llama_context_default_params()
        params.n_ctx = options.n_ctx_seq * options.n_seq
        params.n_seq_max = options.n_seq
        params.kv_unified = False
        params.n_batch = options.n_batch
        params.n_ubatch = min(options.n_ubatch, options.n_batch)
        params.n_threads = params.n_threads_batch = options.threads
        params.type_k = params.type_v = kv_type_id(options.kv_type)
        params.flash_attn_type = FLASH_ATTN[options.flash_attn]
        params.no_perf = True
        ctx = lib.llama_init_from_model(model.ptr, params)
        if not ctx:
            raise ModelFileError(
                "llama.cpp failed to create the context (see the lines above for why)"
            )
        self.ptr = ctx
        self.mem = lib.llama_get_memory(ctx)
        self.n_seq = options.n_seq
        self.n_ctx_seq = lib.llama_n_ctx_seq(ctx)
        self.n_batch = lib.llama_n_batch(ctx)

    def close(self) -> None:
        if self.ptr:
            lib.llama_free(self.ptr)
            self.ptr = None

    def decode(self, batch: Batch) -> None:
        code = lib.llama_decode(self.ptr, batch.raw)
        if code != 0:
            raise DecodeError(f"llama_decode returned {code} for {batch.size} tokens")

    def seq_len(self, seq: int) -> int:
        """Tokens the sequence holds (positions 0..n-1)."""
        return lib.llama_memory_seq_pos_max(self.mem, seq) + 1

    def seq_first(self, seq: int) -> int:
        """The lowest position still held (a sliding-window cache forgets old ones), -1 empty."""
        return lib.llama_memory_seq_pos_min(self.mem, seq)

    def seq_keep(self, seq: int, n: int) -> None:
        """Drop every position from `n` on (n=0 empties the sequence)."""
        if not lib.llama_memory_seq_rm(self.mem, seq, n, -1):
            lib.llama_memory_seq_rm(self.mem, seq, -1, -1)
            raise DecodeError(f"llama.cpp could not cut sequence {seq} at {n}; emptied it")

    def copy_seq(self, src: int, dst: int) -> None:
        """Make `dst` (empty) hold what `src` holds: n choices of one prompt evaluated once.
        Across llama.cpp's per-sequence KV streams the copy is done at the next decode."""
        lib.llama_memory_seq_cp(self.mem, src, dst, -1, -1)

    def save(self, seq: int) -> bytearray:
        """The sequence's KV cells (no logits), as llama_state_seq_get_data writes them."""
        size = lib.llama_state_seq_get_size(self.ptr, seq)
        data = bytearray(size)
        view = (ctypes.c_uint8 * size).from_buffer(data)
        written = lib.llama_state_seq_get_data(self.ptr, view, size, seq)
        del view  # a live ctypes view would pin the buffer's size
        return data if written == size else data[:written]

    def restore(self, seq: int, data: bytearray) -> bool:
        """Load a saved state into `seq` (emptied first); False when llama.cpp refuses it."""
        self.seq_keep(seq, 0)
        view = (ctypes.c_uint8 * len(data)).from_buffer(data)
        read = lib.llama_state_seq_set_data(self.ptr, view, len(data), seq)
        del view
        if read != len(data):
            lib.llama_memory_seq_rm(self.mem, seq, -1, -1)
            return False
        return True


class Batch:
    """A reusable llama_batch of up to `capacity` tokens, one sequence per token."""

    def __init__(self, capacity: int) -> None:
        self.raw = lib.llama_batch_init(capacity, 0, 1)
        self.capacity = capacity
        self.size = 0

    def clear(self) -> None:
        self.size = 0
        self.raw.n_tokens = 0

    def add(self, token: int, pos: int, seq: int, *, logits: bool) -> int:
        """Append one token; returns its row (the index its logits are read at)."""
        row = self.size
        if row >= self.capacity:
            raise ValueError(f"batch full ({self.capacity} tokens)")
        raw = self.raw
        raw.token[row], raw.pos[row], raw.n_seq_id[row] = token, pos, 1
        raw.seq_id[row][0], raw.logits[row] = seq, logits
        self.size = row + 1
        raw.n_tokens = self.size
        return row

    def close(self) -> None:
        if self.capacity:
            lib.llama_batch_free(self.raw)
            self.capacity = 0
