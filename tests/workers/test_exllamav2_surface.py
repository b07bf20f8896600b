"""What the exllamav2 worker does of the whole OpenAI chat API, on the CPU: n choices (one
after another, seeded seed + i), log probabilities (the worker's shapes from the generator's
entries, and the generator's entries from exllamav2's logits), a reply to continue,
min_tokens, top_k, min_p, repeat_penalty and mirostat 2 on exllamav2's sampler. What it
cannot do (no GBNF grammar, no lazy grammar: tools with `tool_choice` `auto`, `grammar`,
`logit_bias`) is a 400 naming `--backend llama.cpp`. JSON replies and forced calls:
tests/workers/test_exllamav2_json.py."""

from __future__ import annotations

import math
import threading

import httpx
import openai
import pytest
from support.exllamav2_fakes import (
    MODEL,
    FakeGenerator,
    StubEngine,
    assert_openai_error,
    decode,
    serving,
    stub_generator,
)
from support.openai_schemas import check

from launcher.workers.generation import GenerationParams


@pytest.fixture
def fake() -> FakeGenerator:
    return FakeGenerator(reply="one two three four")


@pytest.fixture
def client(fake):
    with serving(fake) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=10)


def chat(client, **fields):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], **fields}
    reply = client.chat.completions.create(**body)
    check("CreateChatCompletionResponse", reply.model_dump(mode="json", exclude_unset=True))
    return reply


def test_n_choices_run_one_after_another_with_their_own_seeds(client, fake):
    reply = chat(client, n=3, seed=40)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert [p.seed for p in fake.params] == [40, 41, 42]
    assert reply.usage.completion_tokens == 12
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], n=2, stream=True
    ))  # fmt: skip
    texts = ["", ""]
    for chunk in chunks:
        check(
            "CreateChatCompletionStreamResponse", chunk.model_dump(mode="json", exclude_unset=True)
        )
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == ["one two three four"] * 2


def test_a_stop_string_ends_only_its_own_choice(client, fake):
    fake.reply = "one two three four"
    reply = chat(client, n=2, stop=["three"])
    assert [c.message.content for c in reply.choices] == ["one two "] * 2
    assert [c.finish_reason for c in reply.choices] == ["stop", "stop"]


def test_logprobs_take_openai_shapes(client):
    reply = chat(client, logprobs=True, top_logprobs=2)
    entries = reply.choices[0].logprobs.content
    assert [e.token for e in entries] == ["one ", "two ", "three ", "four"]
    assert all(e.logprob == -0.5 and len(e.top_logprobs) == 2 for e in entries)
    completion = client.completions.create(model=MODEL, prompt="Hi", logprobs=1, max_tokens=9)
    check("CreateCompletionResponse", completion.model_dump(mode="json", exclude_unset=True))
    assert completion.choices[0].logprobs.text_offset == [2, 6, 10, 16]


def test_a_last_assistant_message_is_continued(client, fake):
    messages = [{"role": "user", "content": "Count"}, {"role": "assistant", "content": "One,"}]
    client.chat.completions.create(model=MODEL, messages=messages)
    assert decode(fake.prompts[-1]).endswith("[INST] Count [/INST] One,")


def test_llama_cpp_sampling_fields_reach_the_generator(client, fake):
    extra = {"top_k": 5, "min_p": 0.1, "repeat_penalty": 1.2, "min_tokens": 2,
             "mirostat_mode": 2, "mirostat_tau": 3.0}  # fmt: skip
    chat(client, extra_body=extra)
    params = fake.params[-1]
    assert (params.top_k, params.min_p, params.repeat_penalty, params.min_tokens) == (
        5, 0.1, 1.2, 2
    )  # fmt: skip
    assert (params.mirostat, params.mirostat_tau) == (2, 3.0)


def test_the_sampler_and_job_take_them_as_exllamav2_names_them():
    engine = StubEngine(["a"])
    params = GenerationParams(8, temperature=0.8, top_k=5, min_p=0.1, repeat_penalty=1.2,
                              min_tokens=3, mirostat=2, mirostat_tau=3.0)  # fmt: skip
    list(stub_generator(engine).generate([1], params, threading.Event()))
    job = engine.jobs[0]
    settings = job.gen_settings
    assert (settings.top_k, settings.min_p, settings.token_repetition_penalty) == (5, 0.1, 1.2)
    assert settings.mirostat is True and settings.mirostat_tau == 3.0
    assert job.min_new_tokens == 3 and job.return_logits is False


def test_log_probabilities_come_from_the_jobs_logits():
    rows = [[0.0, 2.0, 1.0, -1.0, 0.0, 0.0, 0.0, 0.5], [3.0, 3.0, 0, 0, 0, 0, 0, 0]]
    engine = StubEngine(["a", "b"], logits=rows)  # each streamed token is id 7
    params = GenerationParams(8, logprobs=2)
    events = list(stub_generator(engine).generate([1], params, threading.Event()))
    assert engine.jobs[0].return_logits is True
    first = events[0].logprobs[0]
    norm = math.log(sum(math.exp(v) for v in rows[0]))
    assert first.token == "H" and first.logprob == pytest.approx(0.5 - norm)
    assert [t.logprob for t in first.top] == pytest.approx([2.0 - norm, 1.0 - norm])
    assert [t.token for t in first.top] == ["B", "C"]
    second = events[1].logprobs[0]
    assert second.top[0].logprob == pytest.approx(3.0 - math.log(2 * math.exp(3) + 6))


def test_what_exllamav2_cannot_do_names_the_backend_that_can(fake):
    with serving(fake) as url:
        for extra, param in (
            ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
            ({"grammar": 'root ::= "a"'}, "grammar"),
        ):
            body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], **extra}
            error = assert_openai_error(
                httpx.post(f"{url}/v1/chat/completions", json=body), 400, param
            )
            assert "--backend llama.cpp" in error["message"]
