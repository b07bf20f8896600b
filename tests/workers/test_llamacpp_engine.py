"""The batch engine and its session slots on a real (generated) model: reuse, eviction to RAM
and disk, restart, concurrency and isolation all give exactly the output of a fresh run."""

from __future__ import annotations

import json

import pytest
from support.engine_fixtures import GREEDY, Engine, tiny_engine_model

from launcher.workers.generation import GenerationParams, SessionKey
from launcher.workers.llamacpp_slots.slot_store import file_name
from launcher.workers.llamacpp_slots.slots import common_prefix

ALICE, BOB = "a1ice0000000000000000000000000000", "b0b00000000000000000000000000000"
USER_TURNS = [
    "hello world the a an and of to in is it you that he",
    "some we can out other were all there when up use your how",
    "said each she which do their time if will way about many then",
    "them write would like so these her long make thing see him two",
]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return tiny_engine_model(tmp_path_factory)


@pytest.fixture
def engines(model_path, tmp_path):
    started = []

    def make(**kw) -> Engine:
        engine = Engine(model_path, tmp_path / "slots", **kw)
        started.append(engine)
        return engine

    yield make
    for engine in started:
        engine.stop()


def conversation(engine: Engine, session: SessionKey | None, turns: int, params=GREEDY):
    """Turns of a chat: each prompt is the history as text (the replies retokenized, as a
    chat template re-renders them) plus a new user line. Returns the replies."""
    history, replies = "", []
    for user in USER_TURNS[:turns]:
        history += f" user: {user} bot:"
        reply = engine.run(engine.tokens(history), session, params=params)
        assert reply.error is None and reply.tokens > 0
        replies.append(reply)
        history += reply.text
    return replies


def test_prefix_reuse_gives_the_output_of_a_fresh_run(engines):
    """Greedy: the random model's near-flat distributions make a seeded draw flip on the
    1e-7 logit noise between batch shapes (measured); Gemma covers seeded sampling."""
    engine = engines(n_seq=2)
    kept = conversation(engine, SessionKey(ALICE, "chat"), 4)
    fresh = conversation(engine, None, 4)  # no session: every turn from scratch
    assert [r.text for r in kept] == [r.text for r in fresh]
    assert kept[0].cached == 0 and all(r.cached > 0 for r in kept[1:])
    assert all(r.cached == 0 for r in fresh)


def test_a_continued_turn_evaluates_only_the_new_tokens(engines):
    engine = engines(n_seq=1)
    key = SessionKey(ALICE, "ids")
    prompt = engine.tokens(USER_TURNS[0])
    first = engine.submit(prompt, key)
    first.result()
    held = engine.on_engine(lambda: list(engine.slots.holder(key).tokens))
    assert held[: len(prompt)] == prompt and len(held) > len(prompt)
    follow = held + engine.tokens(USER_TURNS[1], bos=False)
    assert engine.run(follow, key).cached == len(held)
    # a prompt that changes mid-way keeps exactly the common prefix
    edited = held[:5] + [held[5] + 1] + held[6:]
    assert engine.run(edited, key).cached == 5


def test_a_retokenized_reply_is_reused_up_to_its_first_differing_token(engines):
    engine = engines(n_seq=1)
    key = SessionKey(ALICE, "retokenized")
    reply = engine.run(engine.tokens(USER_TURNS[0]), key)
    held = engine.on_engine(lambda: list(engine.slots.holder(key).tokens))
    again = engine.tokens(USER_TURNS[0] + reply.text + " user: more")  # as a template re-renders
    expected = min(common_prefix(held, again), len(again) - 1)
    assert expected > 0 and engine.run(again, key).cached == expected


def test_after_eviction_to_ram_and_to_disk_the_output_is_the_same(engines, tmp_path):
    reference = conversation(engines(n_seq=2), None, 3)
    for ram_bytes, origin in [(64 << 20, "ram"), (0, "disk")]:
        engine = engines(n_seq=1, ram_bytes=ram_bytes)
        key = SessionKey(ALICE, f"evicted-{origin}")
        history, replies = "", []
        for turn, user in enumerate(USER_TURNS[:3]):
            if turn:  # another session takes the only sequence in between
                engine.run(engine.tokens("intruder " + user), SessionKey(BOB, "other"))
            history += f" user: {user} bot:"
            replies.append(engine.run(engine.tokens(history), key))
            history += replies[-1].text
        assert [r.text for r in replies] == [r.text for r in reference]
        assert all(r.cached > 0 for r in replies[1:])
        assert engine.slots.stats.restores[origin] == 3  # alice twice, the intruder once
    assert (tmp_path / "slots" / file_name(key)).exists()


def test_after_a_restart_a_session_continues_from_disk(engines, tmp_path):
    key = SessionKey(ALICE, "restart")
    reference = conversation(engines(n_seq=2), None, 3)
    first = engines(n_seq=2)
    before = conversation(first, key, 2)
    first.stop()  # saves the pinned session to disk
    assert (tmp_path / "slots" / file_name(key)).exists()
    second = engines(n_seq=2)
    history = "".join(f" user: {u} bot:{r.text}" for u, r in zip(USER_TURNS, before))
    third = second.run(second.tokens(history + f" user: {USER_TURNS[2]} bot:"), key)
    assert [r.text for r in [*before, third]] == [r.text for r in reference]
    assert third.cached > 0 and second.slots.stats.restores["disk"] == 1


def test_four_concurrent_sessions_equal_four_sequential_ones(engines):
    engine = engines(n_seq=4)
    prompts = [engine.tokens(f"user: {text} bot:") for text in USER_TURNS]
    alone = [
        engine.run(p, SessionKey(ALICE, f"seq-{i}"), params=GREEDY) for i, p in enumerate(prompts)
    ]
    steps = engine.engine.stats.steps
    together = [
        engine.submit(p, SessionKey(BOB, f"par-{i}"), params=GREEDY) for i, p in enumerate(prompts)
    ]
    replies = [pending.result() for pending in together]
    assert [r.text for r in replies] == [r.text for r in alone]
    assert engine.engine.stats.steps - steps == GREEDY.max_new_tokens  # decoded together


def test_more_sessions_than_sequences_all_complete(engines):
    engine = engines(n_seq=2)
    jobs = [
        engine.submit(engine.tokens(text), SessionKey(ALICE, f"s{i}"))
        for i, text in enumerate(USER_TURNS * 2)
    ]
    replies = [job.result() for job in jobs]
    assert all(r.error is None and r.tokens == GREEDY.max_new_tokens for r in replies)
    assert [r.text for r in replies[:4]] == [r.text for r in replies[4:]]


def test_identical_first_messages_never_share_state(engines):
    engine = engines(n_seq=4)
    prompt = engine.tokens(USER_TURNS[0])
    assert engine.run(prompt, SessionKey(ALICE, "same")).cached == 0
    assert engine.run(prompt, SessionKey(BOB, "same")).cached == 0  # other key, same id
    assert engine.run(prompt, SessionKey(ALICE, "other")).cached == 0  # same key, other id
    assert engine.run(prompt, None).cached == 0
    assert engine.run(prompt, SessionKey(ALICE, "same")).cached == len(prompt) - 1


def test_a_request_without_a_session_leaves_nothing_behind(engines, tmp_path):
    engine = engines(n_seq=1, ram_bytes=0)
    engine.run(engine.tokens(USER_TURNS[0]))
    slot = engine.slots.slots[0]
    assert slot.key is None and slot.tokens == [] and engine.ctx.seq_len(0) == 0
    assert len(engine.store.ram) == 0 and not list((tmp_path / "slots").iterdir())


def test_a_stateless_prompt_is_reused_by_its_own_owner_only(engines):
    """Agent clients resend their whole history: the same owner's next stateless request
    evaluates only what is new, and gives what a fresh run gives; another owner's identical
    prompt starts from nothing."""
    engine = engines(n_seq=2)
    first = engine.tokens(USER_TURNS[0])
    reply = engine.run(first, owner=ALICE)
    assert reply.cached == 0 and engine.slots.slots[0].cached_for == ALICE
    longer = engine.tokens(USER_TURNS[0] + reply.text + " " + USER_TURNS[1])
    assert engine.run(first, owner=BOB).cached == 0
    again = engine.run(longer, owner=ALICE)
    assert again.cached >= len(first) - 1
    fresh = engines(n_seq=2).run(longer)
    assert (again.text, again.tokens) == (fresh.text, fresh.tokens)


def test_a_session_takes_a_stateless_cache_before_evicting_a_session(engines, tmp_path):
    engine = engines(n_seq=2)
    engine.run(engine.tokens(USER_TURNS[0]), SessionKey(ALICE, "kept"))
    engine.run(engine.tokens(USER_TURNS[1]), owner=BOB)
    assert engine.run(engine.tokens(USER_TURNS[2]), SessionKey(BOB, "new")).cached == 0
    held = {slot.key for slot in engine.slots.slots}
    assert held == {SessionKey(ALICE, "kept"), SessionKey(BOB, "new")}
    assert engine.slots.stats.saves == 0  # nothing had to be saved away


def test_a_cancelled_request_frees_its_sequence_at_the_next_step(engines):
    engine = engines(n_seq=1)
    long = GenerationParams(max_new_tokens=400, temperature=0.0)
    pending = engine.submit(engine.tokens(USER_TURNS[0]), SessionKey(ALICE, "long"), long)
    waiting = engine.submit(engine.tokens(USER_TURNS[1]), SessionKey(BOB, "next"))
    first = pending.inbox.get(timeout=30)
    assert first.tokens == 1
    pending.job.cancel.set()
    assert waiting.result().tokens == GREEDY.max_new_tokens
    assert pending.result().tokens < long.max_new_tokens


def test_forget_drops_the_sequence_and_the_state_file(engines, tmp_path):
    engine = engines(n_seq=1, ram_bytes=0)
    key = SessionKey(ALICE, "deleted")
    engine.run(engine.tokens(USER_TURNS[0]), key)
    engine.run(engine.tokens(USER_TURNS[1]), SessionKey(BOB, "evictor"))  # key -> disk
    path = tmp_path / "slots" / file_name(key)
    assert path.exists()
    assert engine.on_engine(lambda: engine.slots.forget(key))
    assert not path.exists() and engine.run(engine.tokens(USER_TURNS[0]), key).cached == 0


def test_logit_bias_and_grammar_shape_the_reply(engines):
    engine = engines(n_seq=2)
    prompt = engine.tokens(USER_TURNS[0])
    plain = engine.run(prompt, params=GenerationParams(max_new_tokens=1, temperature=0.0))
    model = engine.model
    first = next(t for t in range(model.vocab_size) if model.piece(t) == plain.text.encode())
    banned = GenerationParams(max_new_tokens=1, temperature=0.0, logit_bias={first: -100.0})
    assert engine.run(prompt, params=banned).text != plain.text
    yes_no = GenerationParams(max_new_tokens=8, temperature=0.0, grammar='root ::= "yes" | "no"')
    reply = engine.run(prompt, params=yes_no)
    assert reply.text in {"yes", "no"} and reply.finish == "stop"
    schema_grammar = GenerationParams(
        max_new_tokens=40,
        temperature=0.0,
        grammar='root ::= "{\\"ok\\": " ("true" | "false") "}"',
    )
    assert json.loads(engine.run(prompt, params=schema_grammar).text)["ok"] in (True, False)


def test_a_bad_grammar_is_an_error_for_that_request_only(engines):
    engine = engines(n_seq=1)
    bad = GenerationParams(max_new_tokens=4, grammar="root ::= (")
    reply = engine.run(engine.tokens(USER_TURNS[0]), params=bad)
    assert reply.error is not None and "grammar" in str(reply.error)
    assert engine.run(engine.tokens(USER_TURNS[0])).tokens == GREEDY.max_new_tokens


def test_a_prompt_longer_than_a_sequence_is_refused(engines):
    engine = engines(n_seq=1, n_ctx_seq=256)
    reply = engine.run(list(range(3, 3 + 256)))
    assert reply.error is not None and "256 tokens" in str(reply.error)
    near_end = engine.run(list(range(3, 3 + 250)), params=GenerationParams(max_new_tokens=50))
    # six more tokens fill the sequence; the seventh is picked but never needs evaluating
    assert near_end.error is None and near_end.finish == "length" and near_end.tokens == 7


def test_requests_of_one_session_run_in_order(engines):
    engine = engines(n_seq=2)
    key = SessionKey(ALICE, "ordered")
    pendings = [engine.submit(engine.tokens(USER_TURNS[i]), key) for i in range(3)]
    for pending in pendings:
        pending.result()
    for earlier, later in zip(pendings, pendings[1:]):
        assert earlier.last_at <= later.first_at
