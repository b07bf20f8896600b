"""Continuous batching on llama.cpp: every active request advances in one llama_decode a step.

One engine thread owns the model and the context. Each step it admits waiting requests to
sequences (`SlotManager`: prefix kept, state restored, or a session evicted), drops the ones
whose client left, then builds one batch: the last sampled token of every generating request
(one row each) and, in the room left up to n_batch, chunks of new prompts. After the decode
each request's own sampler chain picks its next token from its row's logits (read first for
log probabilities, and with the end tokens held off until `min_tokens`, when asked).
Requests of one session run one after another in arrival order; different sessions
interleave freely.

A request for n choices waits until n sequences are free, evaluates its prompt once in the
first, and when the prompt's last row is decoded copies that sequence into the others
(`llama_memory_seq_cp`); each choice then samples its first token from the same row with its
own sampler (seeded seed + choice) and runs on as a request of its own. A session keeps only
choice 0's sequence.

It implements the worker's engine interface (`submit`, `pending`, `fatal_error`, `start`,
`stop`) with `GenerationJob`s in and `TokenEvent`s, `END` or an exception out.
"""

from __future__ import annotations

import codecs
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from launcher.protocol import KV_GROWN_LINE, KV_NOT_GROWN_LINES
from launcher.workers.generation import END, GenerationJob, TokenEvent, TokenLogprob, first_line
from launcher.workers.llamacpp_slots.logprobs import LogitReader
from launcher.workers.llamacpp_slots.native import Batch, DecodeError, NativeContext, NativeModel
from launcher.workers.llamacpp_slots.sampling import SamplerChain
from launcher.workers.llamacpp_slots.slots import Slot, SlotManager

logger = logging.getLogger(__name__)

IDLE_WAIT_S = 0.5
EXPIRE_EVERY_S = 600.0  # how often idle sessions past their TTL are looked for
PROMPT_RATE_MIN_TOKENS = 32  # batches this large measure prompt speed for the restore estimate
GROW_NICENESS = 10  # the KV cache's growth yields the cores to decoding


def lower_thread_priority(niceness: int) -> None:
    """Lower the calling thread's priority (Linux: a thread id is a process id to
    setpriority); where that is not so, it keeps the process's."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
    except (OSError, AttributeError) as exc:
        logger.debug("could not lower the thread's priority: %s", exc)


def _grown(future: Future) -> None:
    exc = future.exception()
    if exc is not None:
        logger.warning("%s: %s", KV_NOT_GROWN_LINES[0], exc)
    else:
        logger.info("%s %d sequences", KV_GROWN_LINE, future.result())


@dataclass
class _Group:
    """The choices of one job: END goes out when the last is over, an error only once."""

    live: int
    failed: bool = False


@dataclass(eq=False)
class _Active:
    job: GenerationJob
    slot: Slot
    sampler: SamplerChain
    pending: list[int]  # prompt tokens not yet evaluated
    group: _Group
    choice: int = 0
    forks: list[tuple[Slot, SamplerChain]] = field(default_factory=list)  # choices 1..n-1
    next_token: int | None = None  # sampled and sent, to be evaluated next step
    generated: int = 0
    decoder: Any = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))

    def emit(self, item: object) -> None:
        self.job.emit(item)

    @property
    def keeps_slot(self) -> bool:
        """A session keeps its sequence (choice 0's) between turns, and a known owner's
        stateless prompt stays cached in it for that owner's next request."""
        known = self.job.session is not None or self.job.owner is not None
        return known and self.choice == 0


@dataclass
class EngineStats:
    generated_tokens: int = 0
    steps: int = 0
    decode_seconds: float = 0.0


class BatchEngine:
    """The llama.cpp worker's engine thread (see the module docstring)."""

    def __init__(self, model: NativeModel, ctx: NativeContext, slots: SlotManager) -> None:
        self.model, self.ctx, self.slots = model, ctx, slots
        self.batch = Batch(ctx.n_batch)
        self.logits = LogitReader(model)
        self.stats = EngineStats()
        self.fatal_error: str | None = None
        self._inbox: deque[GenerationJob | Callable[[], None]] = deque()
        self._wake = threading.Condition()
        self._waiting: deque[GenerationJob] = deque()
        self._active: list[_Active] = []
        self._stopping = False
        self._closed = False
        self._expired_at = time.monotonic()
        self._thread: threading.Thread | None = None
        self._grower: threading.Thread | None = None

    # ---- the interface the HTTP layer uses ----------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="llmup-batch", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish: cancel what runs, save every session's KV to disk, free the context.
        A second call does nothing."""
        if self._closed:
            return
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._grower is not None:  # never free the model under a context being built
            self._grower.join(timeout)
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.error("the engine thread did not stop in %.0f s", timeout)
                return
        self._closed = True
        self._close()

    def submit(self, job: GenerationJob) -> None:
        self._post(job)

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run `fn` on the engine thread between two steps (it owns the context)."""
        future: Future = Future()

        def run() -> None:
            try:
                future.set_result(fn())
            except Exception as exc:
                future.set_exception(exc)

        self._post(run)
        return future

    def grow(self, ctx: NativeContext) -> Future:
        """Decode in `ctx` (the same model, more sequences) from the next step on; requests
        in flight carry on where they were. The old context is freed; on failure `ctx` is."""
        return self.call(lambda: self._adopt(ctx))

    def grow_later(self, build: Callable[[], NativeContext]) -> None:
        """Build the full context on a low-priority thread while this one serves, then
        `grow` into it: llama.cpp zeroes a KV cache when it allocates it (seconds for
        several long sequences on a CPU), so a worker starts with the sequences its first
        requests need and grows to the planned ones behind them."""
        self._grower = threading.Thread(
            target=self._grow, args=(build,), name="llmup-kv-grow", daemon=True
        )
        self._grower.start()

    def pending(self) -> int:
        return len(self._inbox) + len(self._waiting) + len(self._active)

    def active(self) -> int:
        return len(self._active)

    def _grow(self, build: Callable[[], NativeContext]) -> None:
        lower_thread_priority(GROW_NICENESS)
        try:
            ctx = build()
        except Exception as exc:  # serving on fewer sequences beats not serving
            logger.warning("%s %d sequence(s): %s", KV_NOT_GROWN_LINES[1], self.ctx.n_seq, exc)
            self.call(self._settle)
            return
        with self._wake:
            if self._stopping:
                ctx.close()
                return
        self.grow(ctx).add_done_callback(_grown)

    def _settle(self) -> None:
        """The growth failed: what the context holds now is all there will be (a request
        for more choices than that is refused, states are saved in its layout)."""
        self.slots.planned_seqs = self.ctx.n_seq

    def _adopt(self, ctx: NativeContext) -> int:
        """Between two steps: the slots move to `ctx`, and every request in flight has
        what its sequence held evaluated again there (with the token sampled last), then
        goes on as it was."""
        old = self.ctx
        if ctx is old:
            return ctx.n_seq
        try:
            self.slots.adopt(ctx)
        except Exception:
            ctx.close()
            raise
        for active in self._active:
            sampled = [] if active.next_token is None else [active.next_token]
            active.pending = active.slot.tokens + sampled + active.pending
            active.slot.tokens, active.next_token = [], None
        self.ctx = ctx
        old.close()
        return ctx.n_seq

    # ---- the loop -----------------------------------------------------------------------

    def _post(self, item: GenerationJob | Callable[[], None]) -> None:
        with self._wake:
            self._inbox.append(item)
            self._wake.notify()

    def _run(self) -> None:
        try:
            while self._next_round():
                self._step()
        except Exception as exc:
            logger.exception("the engine thread failed")
            self.fatal_error = first_line(exc)
            self._fail_all(exc)
        finally:
            self._cancel_all()

    def _next_round(self) -> bool:
        """Take new work; block while there is none. False once stopping."""
        with self._wake:
            while not self._stopping and not (self._inbox or self._waiting or self._active):
                self._wake.wait(IDLE_WAIT_S)
                self._expire_now_and_then()
            if self._stopping:
                return False
            items = list(self._inbox)
            self._inbox.clear()
        for item in items:
            if isinstance(item, GenerationJob):
                self._waiting.append(item)
            else:
                item()
        return True

    def _expire_now_and_then(self) -> None:
        now = time.monotonic()
        if now - self._expired_at >= EXPIRE_EVERY_S:
            self._expired_at = now
            if dropped := self.slots.expire():
                logger.info("%d expired session state(s) dropped", dropped)

    def _step(self) -> None:
        self._admit()
        self._drop_cancelled()
        if not self._active:
            if self._waiting:  # every sequence busy with cancelled work: nothing to run
                time.sleep(0.01)
            return
        rows = self._fill_batch()
        started = time.perf_counter()
        try:
            self.ctx.decode(self.batch)
        except DecodeError as exc:
            self._fail(list(self._active), exc)
            return
        spent = time.perf_counter() - started
        self.stats.steps += 1
        self.stats.decode_seconds += spent
        if self.batch.size >= PROMPT_RATE_MIN_TOKENS:
            self.slots.estimate.record_prompt(self.batch.size, spent)
        for row, active in rows:
            for choice in [active, *self._fork(active)]:
                self._advance(choice, *self._sample(choice, row))

    def _sample(self, active: _Active, row: int) -> tuple[int, TokenLogprob | None]:
        """The next token from `row`'s logits, and its log probability when asked."""
        params = active.job.params
        if active.generated < params.min_tokens:
            self.logits.hold_off_end(self.ctx, row)
        token = active.sampler.sample(self.ctx, row)
        if params.logprobs is None or self.model.is_end(token):
            return token, None
        return token, self.logits.logprob(self.ctx, row, token, params.logprobs)

    def _fork(self, active: _Active) -> list[_Active]:
        """Once a prompt is evaluated: its KV copied to the other choices' sequences."""
        forks = []
        for choice, (slot, sampler) in enumerate(active.forks, start=1):
            self.ctx.copy_seq(active.slot.index, slot.index)
            slot.tokens = list(active.slot.tokens)
            fork = _Active(active.job, slot, sampler, [], active.group, choice=choice)
            self._active.append(fork)
            forks.append(fork)
        active.forks = []
        return forks

    # ---- admission and batch building ---------------------------------------------------

    def _admit(self) -> None:
        """Place waiting jobs in arrival order; a session's later job never passes its
        earlier one."""
        blocked: set[object] = set()
        for job in list(self._waiting):
            if job.cancel.is_set():
                self._waiting.remove(job)
                job.emit(END)
                continue
            if job.session is not None and job.session in blocked:
                continue
            placed = self._place(job)
            if placed:
                self._waiting.remove(job)
            elif job.session is not None:
                blocked.add(job.session)

    def _place(self, job: GenerationJob) -> bool:
        n, most = job.params.n, self.slots.planned_seqs  # a quick start grows to `most`
        if len(job.prompt) >= self.ctx.n_ctx_seq or n > most:
            why = f"n is {n}, more than the {most} sequences this worker decodes"
            if len(job.prompt) >= self.ctx.n_ctx_seq:
                why = f"the prompt needs more than {self.ctx.n_ctx_seq} tokens"
            job.emit(ValueError(why))
            job.emit(END)
            return True
        if self.slots.available() < n:
            return False
        placement = self.slots.acquire(job.session, job.prompt, owner=job.owner)
        if placement is None:
            return False
        slots = [placement.slot, *(self.slots.acquire_blank() for _ in range(n - 1))]
        samplers: list[SamplerChain] = []
        try:
            samplers = [SamplerChain(self.model, job.params, choice=i) for i in range(n)]
        except Exception as exc:
            for sampler in samplers:
                sampler.close()
            for i, slot in enumerate(slots):
                self.slots.release(slot, keep=i == 0)  # type: ignore[arg-type]
            job.emit(exc)
            job.emit(END)
            return True
        pending = job.prompt[placement.reused :]
        job.cached_tokens = placement.reused
        self.slots.stats.evaluated_tokens += len(pending)
        forks = list(zip(slots[1:], samplers[1:]))  # type: ignore[arg-type]
        active = _Active(job, placement.slot, samplers[0], pending, _Group(n), forks=forks)
        self._active.append(active)
        return True

    def _drop_cancelled(self) -> None:
        for active in [a for a in self._active if a.job.ended(a.choice)]:
            self._finish(active, None)

    def _fill_batch(self) -> list[tuple[int, _Active]]:
        """Generating requests first (one token each), then prompt chunks in the room left."""
        batch = self.batch
        batch.clear()
        rows = []
        for active in self._active:
            if active.next_token is not None:
                rows.append((self._add(active, active.next_token, logits=True), active))
                active.next_token = None
        for active in self._active:
            room = batch.capacity - batch.size
            if not active.pending or room <= 0:
                continue
            chunk, active.pending = active.pending[:room], active.pending[room:]
            for i, token in enumerate(chunk):
                last = i == len(chunk) - 1 and not active.pending
                row = self._add(active, token, logits=last)
            if not active.pending:
                rows.append((row, active))
        return rows

    def _add(self, active: _Active, token: int, *, logits: bool) -> int:
        slot = active.slot
        row = self.batch.add(token, len(slot.tokens), slot.index, logits=logits)
        slot.tokens.append(token)
        return row

    # ---- after the decode ---------------------------------------------------------------

    def _advance(self, active: _Active, token: int, logprob: TokenLogprob | None) -> None:
        if self.model.is_end(token):
            self._finish(active, "stop")
            return
        active.generated += 1
        self.stats.generated_tokens += 1
        done = (
            active.generated >= active.job.params.max_new_tokens
            or len(active.slot.tokens) >= self.ctx.n_ctx_seq  # no room to evaluate it
        )
        text = active.decoder.decode(self.model.piece(token), final=done)
        reason = "length" if done else None
        logprobs = (logprob,) if logprob is not None else ()
        active.emit(TokenEvent(text, 1, reason, choice=active.choice, logprobs=logprobs))
        if done:
            self._finish(active, None)
        else:
            active.next_token = token

    def _finish(self, active: _Active, reason: str | None) -> None:
        """End a choice: its last event (when `reason`), its sequence released, and END once
        the job's last choice is over."""
        if reason is not None:
            text = active.decoder.decode(b"", final=True)
            active.emit(TokenEvent(text, 0, reason, choice=active.choice))
        self._retire(active, keep=active.keeps_slot)

    def _retire(self, active: _Active, *, keep: bool, error: Exception | None = None) -> None:
        """Take a choice (and the choices not yet forked from it) off the engine."""
        self._active.remove(active)
        active.sampler.close()
        self.slots.release(active.slot, keep=keep)
        group = active.group
        for slot, sampler in active.forks:
            sampler.close()
            self.slots.release(slot, keep=False)
            group.live -= 1
        active.forks = []
        group.live -= 1
        if error is not None and not group.failed:
            group.failed = True
            active.emit(error)
        if group.live <= 0:
            active.emit(END)

    def _fail(self, failed: list[_Active], exc: Exception) -> None:
        """A decode failed: its requests get the error and their sequences are emptied (what
        they hold is no longer known)."""
        logger.error("decode failed for %d request(s): %s", len(failed), exc)
        for active in failed:
            self._retire(active, keep=False, error=exc)

    def _fail_all(self, exc: Exception) -> None:
        for active in list(self._active):
            if not active.group.failed:
                active.group.failed = True
                active.emit(exc)
        for job in self._waiting:
            job.emit(exc)

    def _cancel_all(self) -> None:
        for active in list(self._active):
            self._retire(active, keep=active.keeps_slot)
        while self._waiting:
            self._waiting.popleft().emit(END)
        while self._inbox:
            item = self._inbox.popleft()
            if isinstance(item, GenerationJob):
                item.emit(END)

    def _close(self) -> None:
        try:
            saved = self.slots.save_all()
            logger.info("saved %d session state(s) for the next start", saved)
        except Exception:
            logger.exception("saving session states at shutdown failed")
        self.batch.close()
        self.ctx.close()
        self.model.close()
