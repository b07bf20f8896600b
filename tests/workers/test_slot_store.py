"""The saved-state stores: RAM bounded in bytes, disk files atomic, identified and bounded."""

from __future__ import annotations

import os
import stat
import time
from array import array

import pytest
from support.worker_fixtures import rewrite_state_header

from launcher.workers.generation import SessionKey
from launcher.workers.llamacpp_slots.slot_store import (
    KEY_FILE,
    MAGIC,
    DiskStore,
    RamStore,
    SavedState,
    SlotStore,
    file_name,
    state_key,
)
from launcher.workers.llamacpp_slots.slots import RestoreEstimate, SlotManager, common_prefix

IDENTITY = {"model": "tiny.gguf", "size": 123, "kv_type": "f16"}
KEY = bytes(range(32))


def state(session: str, n_tokens: int = 10, n_bytes: int = 1000, owner: str = "o1") -> SavedState:
    data = bytearray(os.urandom(n_bytes))
    return SavedState(SessionKey(owner, session), array("i", range(n_tokens)), data)


def disk(tmp_path, **kw) -> DiskStore:
    options = {"key": KEY, "budget": 10**6, "ttl_s": 3600.0, **kw}
    return DiskStore(tmp_path / "slots", IDENTITY, **options)


def test_ram_store_spills_least_recently_used_past_its_byte_budget():
    ram = RamStore(budget=3000)
    a, b, c = state("a"), state("b"), state("c")  # 1040 bytes each
    assert ram.put(a) == [] and ram.put(b) == []
    assert ram.put(c) == [a]  # 3120 > 3000: the oldest goes
    assert ram.bytes_held == b.nbytes + c.nbytes and len(ram) == 2
    assert ram.put(state("huge", n_bytes=5000))[0].key.session == "huge"  # never held
    assert ram.pop(b.key) is b and ram.bytes_held == c.nbytes
    assert [s.key.session for s in ram.drain()] == ["c"] and ram.bytes_held == 0


def test_disk_store_round_trips_a_state_with_its_tokens(tmp_path):
    store = disk(tmp_path)
    saved = state("chat-1", n_tokens=37, n_bytes=4096)
    assert store.put(saved)
    again = disk(tmp_path).get(saved.key)  # a new store (a restart) finds it
    assert again is not None and again.origin == "disk"
    assert again.tokens == saved.tokens and again.data == saved.data
    assert store.bytes_held == (tmp_path / "slots" / file_name(saved.key)).stat().st_size


def test_disk_file_names_hide_session_ids_and_keys_never_mix(tmp_path):
    store = disk(tmp_path)
    mine, theirs = state("../../etc/passwd", owner="alice"), state("../../etc/passwd", owner="bob")
    store.put(mine)
    names = [p.name for p in (tmp_path / "slots").iterdir()]
    assert names == [file_name(mine.key)] and "passwd" not in names[0]
    assert store.get(theirs.key) is None  # same session id, other owner: nothing
    assert file_name(mine.key) != file_name(theirs.key)


def test_a_file_from_another_model_or_layout_is_not_loaded(tmp_path):
    disk(tmp_path).put(state("s"))
    layout = {**IDENTITY, "kv_type": "q8_0"}
    other = DiskStore(tmp_path / "slots", layout, key=KEY, budget=10**6, ttl_s=60)
    assert other.get(SessionKey("o1", "s")) is None
    assert len(other) == 1  # kept: the session may return under the old model


def test_a_damaged_file_is_a_miss_and_is_removed(tmp_path):
    store = disk(tmp_path)
    saved = state("s", n_bytes=5000)
    store.put(saved)
    path = tmp_path / "slots" / file_name(saved.key)
    path.write_bytes(path.read_bytes()[:-10])  # truncated
    assert store.get(saved.key) is None and not path.exists() and len(store) == 0
    path.write_bytes(b"not a state file at all")
    assert disk(tmp_path).get(saved.key) is None and not path.exists()


def test_writes_are_atomic_and_leftover_temp_files_are_cleaned(tmp_path, monkeypatch):
    store = disk(tmp_path)
    first = state("s", n_bytes=100)
    store.put(first)

    def fail(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", fail)
    assert not store.put(state("s", n_bytes=200))  # the failed write leaves the old file
    monkeypatch.undo()
    assert store.get(first.key).data == first.data
    assert [p.name for p in (tmp_path / "slots").iterdir()] == [file_name(first.key)]
    (tmp_path / "slots" / "abc.kv.tmp-999").write_bytes(MAGIC)  # a crash mid-write
    disk(tmp_path)
    assert [p.name for p in (tmp_path / "slots").iterdir()] == [file_name(first.key)]


def test_disk_budget_evicts_the_oldest_files(tmp_path):
    store = disk(tmp_path, budget=3500)
    for name in ("a", "b", "c"):
        assert store.put(state(name))
        time.sleep(0.01)  # distinct modification times
    assert store.get(SessionKey("o1", "a")) is None
    assert store.get(SessionKey("o1", "c")) is not None
    assert store.bytes_held <= 3500
    assert not store.put(state("big", n_bytes=4000))


def test_expired_files_are_purged(tmp_path):
    store = disk(tmp_path)
    store.put(state("old"))
    assert store.purge_expired(now=time.time() + 7200) == 1
    assert len(store) == 0 and not any((tmp_path / "slots").iterdir())


def test_slot_store_spills_ram_to_disk_and_deletes_both(tmp_path):
    store = SlotStore(RamStore(budget=2500), disk(tmp_path))
    a, b, c = state("a"), state("b"), state("c")
    for s in (a, b, c):
        store.put(s)
    assert len(store.ram) == 2 and len(store.disk) == 1  # a went to disk
    taken = store.take(a.key)
    assert taken is not None and taken.origin == "disk" and taken.data == a.data
    assert store.take(b.key).origin == "ram" and store.take(b.key) is None
    assert store.delete(a.key) and store.take(a.key) is None
    assert store.flush() == 1 and len(store.disk) == 1  # c, at shutdown


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([], [1]) == 0


@pytest.mark.parametrize(
    ("prompt_rate", "restore_rate", "tokens", "nbytes", "worth"),
    [
        (None, None, 100, 10**9, True),  # nothing measured yet: restore
        (50.0, 1e9, 100, 10**8, True),  # CPU: 2 s of prompt vs 0.1 s of reading
        (20000.0, 5e8, 100, 10**8, False),  # fast GPU: 5 ms of prompt vs 0.2 s of reading
        (50.0, 1e9, 0, 10, False),  # nothing in common
    ],
)
def test_restore_estimate(prompt_rate, restore_rate, tokens, nbytes, worth):
    estimate = RestoreEstimate()
    if prompt_rate:
        estimate.record_prompt(int(prompt_rate), 1.0)
        estimate.record_restore(int(restore_rate), 1.0)
    assert estimate.worth(tokens, nbytes) is worth


class StubContext:
    """The sequence calls SlotManager makes, on plain lists (positions kept per sequence)."""

    def __init__(self, n_seq: int, first: int = 0) -> None:
        self.n_seq, self.first, self.held = n_seq, first, [0] * n_seq

    def seq_first(self, seq: int) -> int:
        return self.first if self.held[seq] else -1

    def seq_keep(self, seq: int, n: int) -> None:
        self.held[seq] = min(self.held[seq], n)

    def save(self, seq: int) -> bytearray:
        return bytearray(self.held[seq])


@pytest.mark.parametrize(
    ("first", "shared", "kept"),
    [
        (0, 18, 18),  # nothing forgotten: keep the common prefix
        (10, 18, 18),  # window of 4 before position 18 (14..17) still held
        (10, 12, 0),  # positions 8..11 were forgotten: evaluate everything again
    ],
)
def test_a_sliding_window_cache_is_only_cut_where_its_window_is_intact(first, shared, kept):
    ctx = StubContext(1, first=first)
    manager = SlotManager(ctx, SlotStore(RamStore(0), None), n_swa=4)
    slot = manager.slots[0]
    slot.key, slot.tokens, ctx.held[0] = SessionKey("o", "s"), list(range(20)), 20
    prompt = [*range(shared), 99, 98, 97]
    placement = manager.acquire(SessionKey("o", "s"), prompt)
    assert placement.reused == kept and ctx.held[0] == kept and slot.tokens == list(range(kept))


def test_a_whole_prompt_already_held_still_evaluates_its_last_token():
    ctx = StubContext(1)
    manager = SlotManager(ctx, SlotStore(RamStore(0), None))
    slot = manager.slots[0]
    slot.key, slot.tokens, ctx.held[0] = SessionKey("o", "s"), list(range(20)), 20
    assert manager.acquire(SessionKey("o", "s"), list(range(10))).reused == 9


def test_expired_sessions_are_forgotten_in_ram_on_disk_and_in_sequences(tmp_path):
    now = time.time()
    store = SlotStore(RamStore(10**6), disk(tmp_path, ttl_s=60.0), ttl_s=60.0)
    stale, fresh, filed = state("stale"), state("fresh"), state("filed")
    stale.used_at, fresh.used_at, filed.used_at = now - 120, now - 10, now - 120
    store.put(stale)
    store.put(fresh)
    assert store.persist(filed)
    path = tmp_path / "slots" / file_name(filed.key)
    assert abs(path.stat().st_mtime - filed.used_at) < 1  # the file ages with its session
    assert store.purge_expired(now) == 2
    assert store.take(stale.key) is None and store.take(filed.key) is None
    assert store.take(fresh.key) is not None and not path.exists()
    ctx = StubContext(2)
    manager = SlotManager(ctx, SlotStore(RamStore(0), None, ttl_s=60.0), clock=lambda: now)
    old, recent = manager.slots
    old.key, old.tokens, old.last_used, ctx.held[0] = SessionKey("o", "old"), [1], now - 120, 1
    recent.key, recent.last_used = SessionKey("o", "new"), now - 10
    assert manager.expire() == 1 and old.key is None and ctx.held[0] == 0
    assert recent.key == SessionKey("o", "new")


# ---- issue 19, finding 7: a bad file is a miss, never an error, and only ours are loaded --


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"n_tokens": 10**6}, "claims 1000000 tokens"),
        ({"n_bytes": 2**40}, "claims 10 tokens and 1099511627776 bytes"),
        ({"n_tokens": -1}, "not counts"),
        ({"n_bytes": "many"}, "not counts"),
    ],
)
def test_a_header_that_does_not_fit_the_file_is_a_miss_before_anything_is_allocated(
    tmp_path, caplog, change, reason
):
    store = disk(tmp_path)
    saved = state("s")
    store.put(saved)
    path = tmp_path / "slots" / file_name(saved.key)
    rewrite_state_header(path, **change)
    assert store.get(saved.key) is None  # no exception, whatever the header says
    assert not path.exists() and len(store) == 0
    assert reason in caplog.text


def test_a_length_field_past_the_file_and_a_flipped_byte_are_misses(tmp_path, caplog):
    store = disk(tmp_path)
    saved = state("s")
    store.put(saved)
    path = tmp_path / "slots" / file_name(saved.key)
    blob = path.read_bytes()
    path.write_bytes(MAGIC + b"\xff\xff\xff\xff" + blob[len(MAGIC) + 4 :])
    assert disk(tmp_path).get(saved.key) is None and not path.exists()
    assert "claims 4294967295 bytes" in caplog.text
    store = disk(tmp_path)
    store.put(saved)
    blob = bytearray(path.read_bytes())
    blob[-100] ^= 1  # one bit of the KV data
    path.write_bytes(bytes(blob))
    assert store.get(saved.key) is None and not path.exists()
    assert "not written by this llmup" in caplog.text


def test_a_file_signed_with_another_key_is_never_loaded(tmp_path):
    """A well-formed state file from elsewhere (another llmup, or crafted) is deleted unread."""
    saved = state("s")
    elsewhere = DiskStore(tmp_path / "other", IDENTITY, key=b"x" * 32, budget=10**6, ttl_s=60)
    elsewhere.put(saved)
    name = file_name(saved.key)
    (tmp_path / "slots").mkdir()
    (tmp_path / "slots" / name).write_bytes((tmp_path / "other" / name).read_bytes())
    assert disk(tmp_path).get(saved.key) is None
    assert not (tmp_path / "slots" / name).exists()
    assert elsewhere.get(saved.key).data == saved.data  # under its own key it reads back


def test_the_state_key_is_made_once_private_and_replaced_when_damaged(tmp_path):
    path = tmp_path / KEY_FILE
    key = state_key(path)
    assert len(key) == 32 and state_key(path) == key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.write_bytes(b"short")
    fresh = state_key(path)
    assert len(fresh) == 32 and fresh != key
    assert [p.name for p in tmp_path.iterdir()] == [KEY_FILE]  # no temp file left behind
