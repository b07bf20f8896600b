"""Session slots: which conversation each KV-cache sequence holds, and how a turn gets one.

A request for session (owner, id) is pinned to a sequence. A continued turn keeps the longest
common token prefix of what the sequence holds and the new prompt, removes only the differing
tail (llama_memory_seq_rm) and leaves only the rest of the prompt to evaluate. When no
sequence is free, the least recently used idle session's KV is saved into the `SlotStore`
(RAM, then disk) and its sequence reused; when that session returns, its state is restored
with llama_state_seq_set_data if reading it back is estimated to be faster than evaluating
the same tokens again. A request without a session takes a free sequence and leaves it
holds the tokens it evaluated for the same owner's next stateless request (agent clients
resend their whole history each time: llama-server's prompt cache does the same for anyone),
until a session or another owner needs the sequence. Nothing is ever matched across keys: a
saved state is found only under its own (owner, session), and a stateless prefix only by its
own owner, so an identical prefix under another key starts from nothing.

Every method runs on the engine thread, the only one that touches the llama_context.
"""

from __future__ import annotations

import logging
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from launcher.workers.generation import SessionKey
from launcher.workers.llamacpp_slots.native import NativeContext
from launcher.workers.llamacpp_slots.slot_store import SavedState, SlotStore

logger = logging.getLogger(__name__)


def common_prefix(held: Sequence[int], prompt: Sequence[int]) -> int:
    """How many leading tokens two token lists share."""
    n = min(len(held), len(prompt))
    for i in range(n):
        if held[i] != prompt[i]:
            return i
    return n


@dataclass
class Slot:
    """One KV-cache sequence: whose it is, the tokens its cells hold, whether a request runs."""

    index: int
    key: SessionKey | None = None
    tokens: list[int] = field(default_factory=list)
    busy: bool = False
    last_used: float = 0.0  # wall clock, for LRU and expiry
    drop_on_release: bool = False
    cached_for: str | None = None  # the owner whose stateless prompt an unpinned one holds

    def clear(self) -> None:
        """Holds nothing and belongs to no one (its cells are the caller's to empty)."""
        self.tokens, self.key, self.drop_on_release, self.cached_for = [], None, False, None


@dataclass(frozen=True)
class Placement:
    slot: Slot
    reused: int  # prompt tokens already in the KV cache (kept or restored)
    restored_from: str | None  # "ram", "disk" or None


@dataclass
class SlotStats:
    """Counters for /metrics; read from other threads without a lock (plain ints)."""

    restores: dict[str, int] = field(default_factory=lambda: {"ram": 0, "disk": 0})
    saves: int = 0
    reused_tokens: int = 0
    evaluated_tokens: int = 0


class RestoreEstimate:
    """Whether reading a saved state back beats evaluating its tokens again, from measured
    rates (moving averages). Before any measurement a restore is assumed to win, which holds
    on CPUs; a GPU that reads prompts faster than the store can deliver stops restoring."""

    def __init__(self, *, weight: float = 0.3) -> None:
        self.weight = weight
        self.prompt_tokens_per_s: float | None = None
        self.restore_bytes_per_s: float | None = None

    def worth(self, tokens: int, nbytes: int) -> bool:
        if tokens <= 0:
            return False
        if self.prompt_tokens_per_s is None or self.restore_bytes_per_s is None:
            return True
        return nbytes / self.restore_bytes_per_s < tokens / self.prompt_tokens_per_s

    def record_prompt(self, tokens: int, seconds: float) -> None:
        self.prompt_tokens_per_s = self._mix(self.prompt_tokens_per_s, tokens, seconds)

    def record_restore(self, nbytes: int, seconds: float) -> None:
        self.restore_bytes_per_s = self._mix(self.restore_bytes_per_s, nbytes, seconds)

    def _mix(self, old: float | None, amount: float, seconds: float) -> float | None:
        if seconds <= 0:
            return old
        rate = amount / seconds
        return rate if old is None else old + self.weight * (rate - old)


class SlotManager:
    def __init__(
        self,
        ctx: NativeContext,
        store: SlotStore,
        *,
        n_swa: int = 0,
        clock: Callable[[], float] = time.time,
        planned_seqs: int | None = None,
    ) -> None:
        self.ctx, self.store, self.n_swa, self.clock = ctx, store, n_swa, clock
        self.planned_seqs = planned_seqs or ctx.n_seq
        self.slots = [Slot(i) for i in range(ctx.n_seq)]
        self.stats = SlotStats()
        self.estimate = RestoreEstimate()

    # ---- queries ------------------------------------------------------------------------

    def in_use(self) -> int:
        return sum(s.busy for s in self.slots)

    def pinned(self) -> int:
        return sum(s.key is not None for s in self.slots)

    def holder(self, key: SessionKey) -> Slot | None:
        return next((s for s in self.slots if s.key == key), None)

    def available(self) -> int:
        """Sequences a request could be given now (idle, pinned to a session or not)."""
        return sum(not s.busy for s in self.slots)

    # ---- a request's sequence -----------------------------------------------------------

    def acquire(
        self, key: SessionKey | None, prompt: list[int], *, owner: str | None = None
    ) -> Placement | None:
        """A sequence for the request, with the prompt's reusable prefix kept; None while
        every usable sequence is busy (the caller retries after the next step). A stateless
        request (`key` None) from a known `owner` may continue that owner's cached prompt."""
        slot = self.holder(key) if key is not None else self._cached(owner, prompt)
        origin = None
        if slot is None:
            slot = self._free_slot()
            if slot is None:
                return None
            if key is not None:
                origin = self._restore(slot, key, prompt)
        elif slot.busy:
            return None
        reused = self._keep_prefix(slot, prompt)
        slot.key, slot.busy, slot.last_used = key, True, self.clock()
        slot.cached_for = owner if key is None else None
        self.stats.reused_tokens += reused
        return Placement(slot, reused, origin if reused else None)

    def acquire_blank(self) -> Slot | None:
        """An empty sequence for one more choice of a request (n > 1), owned by no session;
        an idle session may be saved away for it. None when every sequence is busy."""
        slot = self._free_slot()
        if slot is None:
            return None
        if slot.tokens:
            self._empty(slot)
        slot.key, slot.busy, slot.last_used = None, True, self.clock()
        return slot

    def release(self, slot: Slot, *, keep: bool) -> None:
        """The request is over: a session keeps its KV pinned, a known owner's stateless
        prompt stays cached (unpinned), anything else is emptied."""
        slot.busy, slot.last_used = False, self.clock()
        owned = slot.key is not None or slot.cached_for is not None
        if not keep or not owned or slot.drop_on_release:
            self._empty(slot)

    def forget(self, key: SessionKey) -> bool:
        """Delete everything held for a session (its sequence, RAM and disk state)."""
        slot = self.holder(key)
        if slot is not None:
            if slot.busy:
                slot.drop_on_release = True
            else:
                self._empty(slot)
        return self.store.delete(key) or slot is not None

    def adopt(self, ctx: NativeContext) -> None:
        """Serve from `ctx` from now on: a context of the same model with more sequences (the
        KV cache grown to the planned size after a quick start). Cells are not copied over:
        a sequence's state carries the stream count of its context, so llama.cpp refuses one
        from a smaller context. An idle session's sequence comes over empty (its next turn
        reads its prompt again); a busy one keeps its token list, for the engine to evaluate
        again in `ctx`."""
        if ctx.n_seq < len(self.slots) or ctx.n_ctx_seq < self.ctx.n_ctx_seq:
            raise ValueError("a grown context must hold at least the sequences it replaces")
        self.ctx = ctx
        for slot in self.slots:
            if not slot.busy:
                slot.clear()
        self.slots += [Slot(i) for i in range(len(self.slots), ctx.n_seq)]

    @property
    def saves_states(self) -> bool:
        """Whether states of this context load into the planned one (and saved ones into
        this): not while a quick start serves from fewer sequences."""
        return self.ctx.n_seq == self.planned_seqs

    def save_all(self) -> int:
        """At shutdown: every pinned session's KV, then the RAM store, to disk."""
        saved = self.store.flush()
        if not self.saves_states:
            return saved
        for slot in sorted(self.slots, key=lambda s: s.last_used):
            if slot.key is not None and slot.tokens:
                saved += self.store.persist(self._snapshot(slot))
        return saved

    def expire(self) -> int:
        """Forget sessions idle past the store's TTL: saved states and idle sequences (the
        proxy has expired their conversations too). Returns how many went."""
        cutoff = self.clock() - self.store.ttl_s
        idle = [s for s in self.slots if s.tokens and not s.busy and s.last_used < cutoff]
        for slot in idle:
            self._empty(slot)
        return len(idle) + self.store.purge_expired(self.clock())

    # ---- internals ----------------------------------------------------------------------

    def _cached(self, owner: str | None, prompt: list[int]) -> Slot | None:
        """The idle unpinned sequence holding the longest prefix of `prompt` that `owner`'s
        own stateless requests left; None when none shares a token."""
        if owner is None:
            return None
        mine = [s for s in self.slots if not s.busy and s.key is None and s.cached_for == owner]
        shared, best = max(((common_prefix(s.tokens, prompt), s) for s in mine),
                           key=lambda pair: pair[0], default=(0, None))  # fmt: skip
        return best if shared > 0 else None

    def _free_slot(self) -> Slot | None:
        """An empty idle sequence, else the least recently used stateless cache (emptied),
        else the least recently used idle session's (saved first); None when all are busy."""
        idle = [s for s in self.slots if not s.busy]
        if not idle:
            return None
        unpinned = [s for s in idle if s.key is None]
        empty = [s for s in unpinned if not s.tokens]
        if empty:
            return empty[0]
        victim = min(unpinned or idle, key=lambda s: s.last_used)
        self._evict(victim)
        return victim

    def _evict(self, slot: Slot) -> None:
        if slot.key is not None and slot.tokens and not slot.drop_on_release and self.saves_states:
            self.store.put(self._snapshot(slot))
            self.stats.saves += 1
            logger.debug("session state of slot %d saved (%d tokens)", slot.index, len(slot.tokens))
        self._empty(slot)

    def _snapshot(self, slot: Slot) -> SavedState:
        assert slot.key is not None
        data = self.ctx.save(slot.index)
        return SavedState(slot.key, array("i", slot.tokens), data, used_at=slot.last_used)

    def _restore(self, slot: Slot, key: SessionKey, prompt: list[int]) -> str | None:
        if not self.saves_states:  # kept for the grown context, which can load it
            return None
        state = self.store.take(key)
        if state is None:
            return None
        shared = common_prefix(state.tokens, prompt)
        if not self.estimate.worth(shared, len(state.data)):
            return None
        started = time.perf_counter()
        if not self.ctx.restore(slot.index, state.data):
            logger.warning("llama.cpp refused a saved state of slot %d; re-reading", slot.index)
            return None
        self.estimate.record_restore(len(state.data), time.perf_counter() - started)
        slot.tokens = state.tokens.tolist()
        self.stats.restores[state.origin] += 1
        return state.origin

    def _keep_prefix(self, slot: Slot, prompt: list[int]) -> int:
        """Cut the sequence to the longest prefix it shares with `prompt`, leaving at least
        one prompt token to evaluate (its logits pick the first reply token)."""
        keep = min(common_prefix(slot.tokens, prompt), len(prompt) - 1)
        if keep < len(slot.tokens) and not self._window_intact(slot, keep):
            keep = 0
        if keep < len(slot.tokens):
            self.ctx.seq_keep(slot.index, keep)
            del slot.tokens[keep:]
        return keep

    def _window_intact(self, slot: Slot, keep: int) -> bool:
        """With sliding-window attention the cache forgets old positions; continuing at
        `keep` needs the whole window before it (llama.cpp's server checks the same)."""
        if self.n_swa <= 0:
            return True
        first = self.ctx.seq_first(slot.index)
        return 0 <= first <= max(0, keep - self.n_swa)

    def _empty(self, slot: Slot) -> None:
        self.ctx.seq_keep(slot.index, 0)
        slot.clear()
