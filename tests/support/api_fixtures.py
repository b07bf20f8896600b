"""llmup's slot worker on the generated tiny model behind a proxy with two API keys
(`key-a`, `key-b`) and the replica name `r1`: what the Responses, Conversations and Messages
API tests run against (a plugin of tests/conftest.py); each module gets its own worker and
proxy."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from launcher.served import StaticBackend, WorkerKind
from support.backend_fixtures import TEMPLATE, RunningProxy, proxy_settings, serve_proxy
from support.ggufgen import write_llama_gguf
from support.worker_fixtures import SlotWorker, write_chat_model

KEYS = ["key-a", "key-b"]


@pytest.fixture(scope="module")
def slot_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlotWorker]:
    folder = tmp_path_factory.mktemp("slot-worker")
    model = write_llama_gguf(folder / "tiny-chat.gguf", chat_template=TEMPLATE, seed=5)
    running = SlotWorker.start(model, folder / "slots", "--parallel", "2")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def slot_proxy(
    slot_worker: SlotWorker, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningProxy]:
    backend = StaticBackend(
        base_url=slot_worker.url, model_id="tiny", context=512, kind=WorkerKind.LLAMACPP_SLOTS
    )
    home = tmp_path_factory.mktemp("home")
    running = serve_proxy(proxy_settings(home, api_keys=KEYS, replica_name="r1"), backend)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def chat_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlotWorker]:
    """The tiny chat model (seed 7) on two sequences: the tool tests' worker."""
    folder = tmp_path_factory.mktemp("chat-worker")
    running = SlotWorker.start(
        write_chat_model(folder, seed=7), folder / "slots", "--parallel", "2"
    )
    yield running
    running.stop()


def slots_backend(worker: SlotWorker, context: int = 4096) -> StaticBackend:
    """The slot worker as the proxy sees it."""
    return StaticBackend(
        base_url=worker.url, model_id="tiny", context=context, kind=WorkerKind.LLAMACPP_SLOTS
    )
