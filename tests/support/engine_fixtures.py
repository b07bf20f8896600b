"""llmup's llama.cpp batch engine on a generated tiny GGUF, driven without HTTP.

`Engine` builds model, context, slot stores and engine for one test; `run` sends one
request and waits for its reply; `submit` starts one and returns a `Pending` to collect.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher.workers.generation import (
    END,
    GenerationJob,
    GenerationParams,
    SessionKey,
    TokenEvent,
)
from launcher.workers.llamacpp_slots.engine import BatchEngine
from launcher.workers.llamacpp_slots.native import (
    ContextOptions,
    ModelOptions,
    NativeContext,
    NativeModel,
    route_llama_logs,
)
from launcher.workers.llamacpp_slots.slot_store import DiskStore, RamStore, SlotStore
from launcher.workers.llamacpp_slots.slots import SlotManager
from support.ggufgen import write_llama_gguf

IDENTITY = {"model": "tiny", "kv_type": "f16"}
KEY = b"k" * 32  # the saved-state HMAC key
GREEDY = GenerationParams(max_new_tokens=24, temperature=0.0)
SEEDED = GenerationParams(max_new_tokens=24, temperature=0.9, top_p=0.95, seed=1234)


def tiny_model_file(folder: Path) -> Path:
    """Big enough to keep a conversation interesting, small enough to load in milliseconds."""
    return write_llama_gguf(folder / "engine-tiny.gguf", n_layer=2, n_embd=64, seed=7)


@dataclass
class Reply:
    text: str
    tokens: int
    finish: str | None
    cached: int
    error: BaseException | None = None


@dataclass
class Pending:
    job: GenerationJob
    inbox: queue.Queue = field(default_factory=queue.Queue)
    first_at: float | None = None
    last_at: float | None = None

    def put(self, item: object) -> None:
        """The job's emit: keeps the item and when the engine sent it."""
        self.last_at = time.monotonic()
        self.first_at = self.first_at or self.last_at
        self.inbox.put(item)

    def result(self, timeout: float = 60.0) -> Reply:
        pieces, tokens, finish, error = [], 0, None, None
        while (item := self.inbox.get(timeout=timeout)) is not END:
            if isinstance(item, BaseException):
                error = item
                continue
            assert isinstance(item, TokenEvent)
            pieces.append(item.text)
            tokens += item.tokens
            finish = item.finish_reason or finish
        return Reply("".join(pieces), tokens, finish, self.job.cached_tokens, error)


class Engine:
    """One engine over the tiny model; `stop` saves sessions as a worker shutdown does."""

    def __init__(
        self,
        model_path: Path,
        slots_dir: Path,
        *,
        n_seq: int = 2,
        n_ctx_seq: int = 512,
        ram_bytes: int = 64 << 20,
        disk_bytes: int = 256 << 20,
        n_batch: int = 512,
        planned_seqs: int | None = None,
    ) -> None:
        route_llama_logs(False)
        self.model = NativeModel(ModelOptions(model_path))
        self.ctx = NativeContext(
            self.model, ContextOptions(n_ctx_seq=n_ctx_seq, n_seq=n_seq, n_batch=n_batch)
        )
        disk = DiskStore(slots_dir, IDENTITY, key=KEY, budget=disk_bytes, ttl_s=3600.0)
        self.store = SlotStore(RamStore(ram_bytes), disk)
        self.slots = SlotManager(
            self.ctx, self.store, n_swa=self.model.n_swa, planned_seqs=planned_seqs
        )
        self.engine = BatchEngine(self.model, self.ctx, self.slots)
        self.engine.start()

    def tokens(self, text: str, *, bos: bool = True) -> list[int]:
        return self.model.tokenize(text, add_special=bos, parse_special=False)

    def submit(
        self,
        prompt: list[int],
        session: SessionKey | None = None,
        params: GenerationParams = GREEDY,
        *,
        owner: str | None = None,
    ) -> Pending:
        cancel = threading.Event()
        job = GenerationJob(list(prompt), params, cancel, lambda item: None, session, owner=owner)
        pending = Pending(job)
        job.emit = pending.put
        self.engine.submit(job)
        return pending

    def run(self, prompt: list[int], session: SessionKey | None = None, **kw: Any) -> Reply:
        return self.submit(prompt, session, **kw).result()

    def on_engine(self, fn: Any) -> Any:
        return self.engine.call(fn).result(timeout=30)

    def stop(self) -> None:
        self.engine.stop()


def tiny_engine_model(tmp_path_factory: Any) -> Path:
    return tiny_model_file(tmp_path_factory.mktemp("engine-model"))
