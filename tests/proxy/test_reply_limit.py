"""`proxy.max_tokens` (`llmup serve --max-tokens`, llama-server's `-n`): the reply limit of
a request that sets none and the ceiling of one that asks for more, on every generating API
(chat, completions, Responses, Messages), against llmup's slot worker on the tiny model.
The same worker behind a proxy without the limit writes longer replies, so each check could
fail."""

from __future__ import annotations

import anthropic
import openai
import pytest
from support.backend_fixtures import proxy_settings, serve_proxy

from launcher.served import StaticBackend, WorkerKind

LIMIT = 3
CHAT = [{"role": "user", "content": "hello world the time"}]


@pytest.fixture(scope="module")
def limited(slot_worker, tmp_path_factory):
    backend = StaticBackend(
        base_url=slot_worker.url, model_id="tiny", context=512, kind=WorkerKind.LLAMACPP_SLOTS
    )
    home = tmp_path_factory.mktemp("limited")
    running = serve_proxy(proxy_settings(home, api_keys=["key-a"], max_tokens=LIMIT), backend)
    yield running
    running.stop()


def sdk(proxy) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key="key-a", max_retries=0)


def chat_tokens(proxy, **kw) -> int:
    reply = sdk(proxy).chat.completions.create(model="tiny", messages=CHAT, temperature=0, **kw)
    return reply.usage.completion_tokens


def test_unlimited_replies_are_longer_than_the_limit(slot_proxy):
    assert chat_tokens(slot_proxy, max_tokens=12) > LIMIT


def test_chat_gets_the_limit_as_default_and_ceiling(limited):
    assert chat_tokens(limited) == LIMIT
    assert chat_tokens(limited, max_tokens=50) == LIMIT
    assert chat_tokens(limited, max_completion_tokens=50) == LIMIT
    assert chat_tokens(limited, max_tokens=2) == 2


def test_completions_responses_and_messages_are_capped_too(limited):
    text = sdk(limited).completions.create(model="tiny", prompt="hello world", max_tokens=40,
                                          temperature=0)  # fmt: skip
    assert text.usage.completion_tokens == LIMIT
    made = sdk(limited).responses.create(model="tiny", input="hello world the time", store=False,
                                      temperature=0)  # fmt: skip
    assert made.usage.output_tokens == LIMIT and made.incomplete_details is not None
    claude = anthropic.Anthropic(base_url=limited.url, api_key="key-a", max_retries=0)
    message = claude.messages.create(model="tiny", max_tokens=1000, messages=CHAT,
                                     extra_body={"temperature": 0})  # fmt: skip
    assert message.usage.output_tokens == LIMIT and message.stop_reason == "max_tokens"
