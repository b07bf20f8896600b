"""`/llmup/prompt-tokens`: each llama.cpp worker counts a prompt with the very code it
generates from, so the count is the `usage.prompt_tokens` of the same request, with the
GGUF's own template or Meta's Llama-2 format, for a chat or a completion, and also for a
prompt too long to serve."""

from __future__ import annotations

import httpx
import llama_cpp
import pytest
from support.backend_fixtures import TEMPLATE
from support.ggufgen import write_llama_gguf
from support.worker_fixtures import SlotWorker

from launcher.workers.llamacpp_python import patches as llamacpp_patches

pytestmark = pytest.mark.timeout(180)

CHATS = [
    [{"role": "user", "content": "hello world"}],
    [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "the world"},
        {"role": "user", "content": "what time"},
    ],
]
TEMPLATES = {"template": TEMPLATE, "no-template": None}


@pytest.fixture(scope="module", params=list(TEMPLATES))
def model(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    template = TEMPLATES[request.param]
    return write_llama_gguf(folder / "tiny.gguf", chat_template=template), template


@pytest.fixture(scope="module")
def worker(model):
    path, _ = model
    running = SlotWorker.start(path, path.parent / "slots", "--context", "256")
    yield running
    running.stop()


@pytest.mark.parametrize("messages", CHATS)
def test_the_slot_worker_counts_what_it_generates_from(worker, messages):
    body = {"model": "tiny", "messages": messages}
    counted = httpx.post(worker.url + "/llmup/prompt-tokens", json=body).json()
    reply = httpx.post(worker.url + "/v1/chat/completions", json={**body, "max_tokens": 1})
    assert counted["prompt_tokens"] == reply.json()["usage"]["prompt_tokens"]
    assert counted["context"] == 256 and len(counted["message_tokens"]) == len(messages)
    prompt = {"model": "tiny", "prompt": "hello world"}
    counted = httpx.post(worker.url + "/llmup/prompt-tokens", json=prompt).json()
    reply = httpx.post(worker.url + "/v1/completions", json={**prompt, "max_tokens": 1})
    assert counted["prompt_tokens"] == reply.json()["usage"]["prompt_tokens"] == 3


@pytest.fixture(scope="module")
def llama(model):
    """llama-cpp-python's Llama as its server loads it for llmup (chat format llama-2 when the
    file has no template)."""
    llamacpp_patches.apply()
    path, template = model
    chat_format = None if template else "llama-2"
    loaded = llama_cpp.Llama(str(path), n_ctx=256, verbose=False, chat_format=chat_format)
    yield loaded
    loaded.close()


@pytest.mark.parametrize("messages", CHATS)
def test_llama_cpp_pythons_own_code_counts_the_prompt(llama, messages):
    counted = llamacpp_patches.count_prompt(llama, {"messages": messages})
    reply = llama.create_chat_completion(messages=messages, max_tokens=1)
    assert counted.prompt_tokens == reply["usage"]["prompt_tokens"]
    assert counted.context == 256 - llamacpp_patches.UTF8_HOLDBACK_TOKENS
    counted = llamacpp_patches.count_prompt(llama, {"prompt": "hello world"})
    assert (
        counted.prompt_tokens
        == llama.create_completion("hello world", max_tokens=1)["usage"]["prompt_tokens"]
    )
    too_long = [{"role": "user", "content": "hello " * 400}]
    assert llamacpp_patches.count_prompt(llama, {"messages": too_long}).prompt_tokens > 400
