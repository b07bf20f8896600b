"""The KV cache sized lazily: a worker starts on one sequence and grows to the planned ones
behind its first requests, without losing a session's cells or a request in flight."""

from __future__ import annotations

import logging
import threading

import pytest
from support.engine_fixtures import GREEDY, Engine, tiny_engine_model

from launcher.workers.generation import GenerationParams, SessionKey
from launcher.workers.llamacpp_slots import server
from launcher.workers.llamacpp_slots.native import ContextOptions, NativeContext

ALICE = "a1ice0000000000000000000000000000"
LONG = GenerationParams(max_new_tokens=120, temperature=0.0)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return tiny_engine_model(tmp_path_factory)


@pytest.fixture
def engine(model_path, tmp_path):
    started = Engine(model_path, tmp_path / "slots", n_seq=1, planned_seqs=3)
    yield started
    started.stop()


def bigger(engine: Engine, n_seq: int) -> NativeContext:
    return NativeContext(engine.model, ContextOptions(n_ctx_seq=512, n_seq=n_seq))


def test_a_session_after_the_growth_reads_its_prompt_again(engine) -> None:
    """Cells do not move (a state carries its context's stream count): the idle session's
    next turn is evaluated afresh, with the output of a fresh run; later turns reuse again."""
    key = SessionKey(ALICE, "chat")
    first = engine.run(engine.tokens("hello world the a an"), key)
    held = engine.on_engine(lambda: list(engine.slots.holder(key).tokens))
    assert engine.engine.grow(bigger(engine, 3)).result(timeout=30) == 3
    assert engine.on_engine(lambda: len(engine.slots.slots)) == 3
    follow = held + engine.tokens(" of to in is", bos=False)
    again = engine.run(follow, key)
    assert first.error is None and again.cached == 0
    assert again.text == engine.run(follow).text
    held = engine.on_engine(lambda: list(engine.slots.holder(key).tokens))
    assert engine.run(held + engine.tokens(" said", bos=False), key).cached == len(held)


def test_states_are_neither_saved_nor_restored_before_the_growth(engine) -> None:
    """A state saved from the small context would not load into the planned one, nor a
    saved one into it: evictions drop, restores wait for the grown context."""
    alice, bob = SessionKey(ALICE, "one"), SessionKey(ALICE, "two")
    engine.run(engine.tokens("hello world"), alice)
    engine.run(engine.tokens("said each she"), bob)  # the one sequence goes to bob
    assert engine.on_engine(lambda: engine.slots.stats.saves) == 0
    assert engine.on_engine(lambda: engine.slots.save_all()) == 0


def test_a_request_in_flight_carries_on_in_the_grown_context(engine) -> None:
    """The growth is asked for from the engine thread itself (the request's 5th token), so
    it lands between two steps of the running request, whatever the machine's load."""
    prompt = engine.tokens("some we can out other were all there")
    alone = engine.run(prompt, params=LONG)
    ctx, asked, seen = bigger(engine, 2), [], []
    running = engine.submit(prompt, params=LONG)
    emit = running.job.emit

    def emit_and_grow(item: object) -> None:
        emit(item)
        seen.append(item)
        if len(seen) == 5:
            asked.append(engine.engine.grow(ctx))

    running.job.emit = emit_and_grow
    reply = running.result()
    assert asked and asked[0].result(timeout=30) == 2
    assert reply.error is None and reply.tokens == LONG.max_new_tokens
    assert reply.text == alone.text


def test_the_grown_context_decodes_requests_together(engine) -> None:
    engine.engine.grow(bigger(engine, 3)).result(timeout=30)
    prompts = [engine.tokens(t) for t in ("hello world", "said each she", "them write")]
    pending = [engine.submit(p, params=LONG) for p in prompts]
    replies = [p.result() for p in pending]
    assert all(r.error is None and r.tokens == 120 for r in replies)
    steps = engine.engine.stats.steps
    assert steps < 3 * 120  # one decode step advanced several requests


def test_a_failed_growth_keeps_serving_on_what_it_has(engine, caplog) -> None:
    done = threading.Event()

    def failing() -> NativeContext:
        done.set()
        raise MemoryError("no room for the planned KV cache")

    with caplog.at_level(logging.WARNING):
        engine.engine.grow_later(failing)
        assert done.wait(30)
        engine.engine._grower.join(30)
    assert "keeps 1 sequence(s)" in caplog.text
    assert engine.run(engine.tokens("hello world")).error is None
    assert engine.on_engine(lambda: len(engine.slots.slots)) == 1


def test_a_context_with_fewer_sequences_is_refused(engine) -> None:
    engine.engine.grow(bigger(engine, 2)).result(timeout=30)
    smaller = bigger(engine, 1)
    with pytest.raises(ValueError, match="at least the sequences"):
        engine.engine.grow(smaller).result(timeout=30)
    assert engine.on_engine(lambda: len(engine.slots.slots)) == 2
    assert engine.run(engine.tokens("hello"), params=GREEDY).error is None


def test_the_worker_starts_on_the_initial_sequences() -> None:
    args = server.build_parser().parse_args(
        ["--model", "m.gguf", "--port", "1", "--parallel", "8", "--initial-parallel", "1"]
    )
    planned = ContextOptions(n_ctx_seq=4096, n_seq=8)
    assert server.initial_options(args, planned).n_seq == 1
    args.initial_parallel = None
    assert server.initial_options(args, planned).n_seq == 8
    args.initial_parallel = 20  # never more than planned
    assert server.initial_options(args, planned).n_seq == 8


def test_n_choices_wait_for_the_growth_instead_of_being_refused(engine) -> None:
    """Two choices need two sequences: on the quick start's one, the request waits for the
    planned three instead of being refused."""
    params = GenerationParams(max_new_tokens=4, temperature=0.0, n=2)
    waiting = engine.submit(engine.tokens("hello world"), params=params)
    engine.engine.grow(bigger(engine, 3)).result(timeout=30)
    reply = waiting.result()
    assert reply.error is None and reply.finish is not None


def test_after_a_failed_growth_what_cannot_fit_is_refused(engine) -> None:
    def failing() -> NativeContext:
        raise MemoryError("no room")

    engine.engine.grow_later(failing)
    engine.engine._grower.join(30)
    assert engine.on_engine(lambda: engine.slots.planned_seqs) == 1
    params = GenerationParams(max_new_tokens=4, temperature=0.0, n=2)
    reply = engine.run(engine.tokens("hello world"), params=params)
    assert isinstance(reply.error, ValueError) and "more than the 1 sequences" in str(reply.error)
