"""Issue 19, finding 7, on a real worker: a damaged saved-state file costs its session only
a re-read of the history, the engine and other sessions carry on, and the file is gone (it
cannot fail again after a restart)."""

from __future__ import annotations

import httpx
import pytest
from support.worker_fixtures import (
    CLEAN_WORDS,
    SlotWorker,
    cached_of,
    rewrite_state_header,
    text_of,
    write_chat_model,
)

from launcher.workers.generation import SessionKey
from launcher.workers.llamacpp_slots.slot_store import file_name

pytestmark = pytest.mark.timeout(180)

ALICE, BOB = ("a" * 32, "chat"), ("b" * 32, "chat")
REPLY = {"max_tokens": 8, "logit_bias": CLEAN_WORDS}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_chat_model(tmp_path_factory.mktemp("corrupt-model"))


def test_a_corrupt_state_file_is_a_miss_and_nobody_else_notices(model, tmp_path):
    slots = tmp_path / "slots"
    # one sequence and no RAM store: a session that loses its sequence goes straight to disk
    worker = SlotWorker.start(model, slots, "--parallel", "1", "--slot-ram-mib", "0")
    try:
        alice = [{"role": "user", "content": "hello world the a an and of to"}]
        bob = [{"role": "user", "content": "some we can out other were all"}]
        alice.append({"role": "assistant", "content": text_of(worker.chat(alice, ALICE, **REPLY))})
        bob.append({"role": "assistant", "content": text_of(worker.chat(bob, BOB, **REPLY))})
        path = slots / file_name(SessionKey(*ALICE))
        assert path.exists()  # Alice's KV went to disk when Bob took the sequence
        rewrite_state_header(path, n_tokens=10**6)

        alice.append({"role": "user", "content": "said each she which do their"})
        continued = worker.chat(alice, ALICE, **REPLY)
        assert cached_of(continued) == 0  # the history was read again
        assert not path.exists()  # deleted: the next start cannot trip on it again

        bob.append({"role": "user", "content": "time if will way about many"})
        assert cached_of(worker.chat(bob, BOB, **REPLY)) > 0  # Bob's own file still restores
        health = httpx.get(worker.url + "/health", timeout=30)
        assert health.status_code == 200 and health.json()["status"] == "ok"
        assert "dropping unreadable session state" in worker.log_text()
        assert text_of(continued) == text_of(worker.chat(alice, **REPLY))  # as a fresh request
    finally:
        worker.stop()
