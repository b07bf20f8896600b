"""The whole OpenAI chat API on llmup's slot worker, driven by the official `openai` client
on a generated model: tool calls (forced, named, streamed, continued with results), JSON
schema replies, log probabilities, n choices forked from one prompt, a reply to continue,
min_tokens, mirostat and seeds. Random weights write nonsense, but a grammar makes even
nonsense valid JSON of the schema, so every forced call parses and validates. Every reply
and chunk is checked against OpenAI's published schemas (the worker's own replies: the
`system_fingerprint` is the proxy's to add)."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from support.openai_schemas import check
from support.worker_fixtures import CLEAN_WORDS, SlotWorker, write_chat_model

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 6},
        "unit": {"enum": ["c", "f"]},
        "days": {"type": "integer", "minimum": 1},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME = {"type": "object", "properties": {"zone": {"type": "boolean"}}, "required": ["zone"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "what is the weather in paris"}]
WORDS = {"logit_bias": CLEAN_WORDS}  # whole words, no end: text that tokenizes back alike
# Random weights write byte tokens that are not UTF-8 (the worker sends U+FFFD for them, so
# a string can look longer than the characters llama.cpp's grammar counted): ASCII only
# where a reply's strings are checked against a maxLength.
ASCII = {"logit_bias": {str(3 + byte): -100 for byte in range(0x80, 0x100)}}


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    folder = tmp_path_factory.mktemp("surface")
    running = SlotWorker.start(write_chat_model(folder), folder / "slots", "--parallel", "3")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(worker) -> openai.OpenAI:
    return openai.OpenAI(base_url=worker.url + "/v1", api_key="unused", max_retries=0)


def raw(worker: SlotWorker, route: str, body: dict) -> httpx.Response:
    return httpx.post(worker.url + route, json={"model": "tiny", **body}, timeout=120)


def chat(client, **fields):
    reply = client.chat.completions.create(model="tiny", **{"messages": ASK, **fields})
    check("CreateChatCompletionResponse", reply.model_dump(mode="json", exclude_unset=True))
    return reply


def stream(client, **fields) -> list:
    chunks = list(client.chat.completions.create(model="tiny", stream=True, **fields))
    for chunk in chunks:
        check(
            "CreateChatCompletionStreamResponse", chunk.model_dump(mode="json", exclude_unset=True)
        )
    return chunks


def valid_calls(message) -> list[tuple[str, dict]]:
    calls = []
    for call in message.tool_calls or []:
        arguments = json.loads(call.function.arguments)
        jsonschema.validate(arguments, SCHEMAS[call.function.name])
        assert call.id.startswith("call_") and call.type == "function"
        calls.append((call.function.name, arguments))
    return calls


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_forced_call_always_parses_and_validates(client, seed):
    reply = chat(
        client, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
        max_tokens=400, temperature=1.0, seed=seed, extra_body=ASCII,
    )  # fmt: skip
    choice = choice_of(reply)
    assert choice.finish_reason == "tool_calls"
    assert len(valid_calls(choice.message)) == 1 and choice.message.content is None


def choice_of(reply):
    assert len(reply.choices) == 1
    return reply.choices[0]


def test_a_named_function_is_the_one_called(client):
    named = {"type": "function", "function": {"name": "get_time"}}
    reply = chat(client, tools=TOOLS, tool_choice=named, max_tokens=300, temperature=0,
                 extra_body=ASCII)  # fmt: skip
    calls = valid_calls(choice_of(reply).message)
    assert calls and {name for name, _ in calls} == {"get_time"}


def test_parallel_calls_each_validate_with_their_own_ids(client):
    reply = chat(client, tools=TOOLS, tool_choice="required", max_tokens=300, seed=9,
                 extra_body=ASCII)  # fmt: skip
    message = choice_of(reply).message
    complete = [c for c in message.tool_calls if c.function.arguments.endswith("}")]
    assert complete and len({c.id for c in message.tool_calls}) == len(message.tool_calls)
    for call in complete[: len(complete) - (reply.choices[0].finish_reason == "length")]:
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_a_streamed_call_arrives_as_openai_streams_it(client):
    fields = {"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False}
    fields |= {"messages": ASK, "max_tokens": 400, "temperature": 0.7, "seed": 4}
    fields |= {"extra_body": ASCII}
    whole = chat(client, **fields)
    chunks = stream(client, **fields, stream_options={"include_usage": True})
    pieces = [
        c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls
    ]
    first = pieces[0][0]
    assert first.index == 0 and first.id.startswith("call_") and first.type == "function"
    assert first.function.name == "get_weather" or first.function.name == "get_time"
    assert first.function.arguments == ""
    assert all(p[0].id is None and p[0].function.name is None for p in pieces[1:])
    arguments = "".join(p[0].function.arguments for p in pieces)
    assert arguments == whole.choices[0].message.tool_calls[0].function.arguments
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "tool_calls" and finishes.count("tool_calls") == 1
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_tool_results_continue_the_conversation(client):
    call = chat(client, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                max_tokens=400, temperature=0, extra_body=ASCII)  # fmt: skip
    message = call.choices[0].message
    result = {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": "sunny"}
    history = [*ASK, message.model_dump(exclude_none=True), result]
    reply = chat(client, messages=history, tools=TOOLS, max_tokens=6, **{"extra_body": WORDS})
    assert choice_of(reply).message.content and reply.choices[0].finish_reason == "length"
    assert reply.usage.prompt_tokens > call.usage.prompt_tokens + call.usage.completion_tokens


def test_tool_choice_none_and_functions_answer_as_asked(client):
    free = chat(client, tools=TOOLS, tool_choice="none", max_tokens=5, extra_body=WORDS)
    assert choice_of(free).message.tool_calls is None and free.choices[0].message.content
    legacy = chat(
        client, functions=[TOOLS[1]["function"]], function_call={"name": "get_time"},
        max_tokens=300, temperature=0, extra_body=ASCII,
    )  # fmt: skip
    choice = choice_of(legacy)
    assert choice.finish_reason == "function_call" and choice.message.tool_calls is None
    jsonschema.validate(json.loads(choice.message.function_call.arguments), TIME)


def test_json_schema_replies_follow_the_schema(client, worker):
    schema = {**WEATHER, "required": ["city", "unit", "days"]}
    response_format = {"type": "json_schema", "json_schema": {"name": "w", "schema": schema}}
    reply = chat(client, response_format={**response_format, "strict": True}, max_tokens=300,
                 temperature=1.0, seed=5, extra_body=ASCII)  # fmt: skip
    jsonschema.validate(json.loads(choice_of(reply).message.content), schema)
    completion = raw(worker, "/v1/completions", {
        "prompt": "weather:", "max_tokens": 300, "response_format": response_format, "seed": 6,
        **ASCII,
    }).json()  # fmt: skip
    check("CreateCompletionResponse", completion)
    jsonschema.validate(json.loads(completion["choices"][0]["text"]), schema)
    bad = {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "date"}}}
    refused = raw(worker, "/v1/chat/completions", {"messages": ASK, "response_format": bad})
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "response_format.json_schema.schema"


def test_log_probabilities_come_with_each_token(client):
    reply = chat(client, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    entries = choice_of(reply).logprobs.content
    assert len(entries) == reply.usage.completion_tokens == 6
    text = b"".join(bytes(e.bytes) for e in entries).decode(errors="replace")
    assert text == reply.choices[0].message.content
    for entry in entries:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.token == entry.top_logprobs[0].token  # greedy took the likeliest
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        ranked = [t.logprob for t in entry.top_logprobs]
        assert ranked == sorted(ranked, reverse=True)
    chunks = stream(client, messages=ASK, max_tokens=6, temperature=0, logprobs=True,
                    top_logprobs=3)  # fmt: skip
    streamed = [
        e
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
    ]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in entries]


def test_completions_logprobs_in_the_legacy_shape(client):
    reply = client.completions.create(model="tiny", prompt="hello world", max_tokens=5,
                                      temperature=0, logprobs=2, extra_body=WORDS)  # fmt: skip
    check("CreateCompletionResponse", reply.model_dump(mode="json", exclude_unset=True))
    logprobs = reply.choices[0].logprobs
    assert "".join(logprobs.tokens) == reply.choices[0].text and len(logprobs.tokens) == 5
    assert logprobs.text_offset[0] == len("hello world")
    assert all(len(top) <= 2 for top in logprobs.top_logprobs)
    chunks = list(client.completions.create(model="tiny", prompt="hello world", max_tokens=5,
                                            temperature=0, logprobs=2, stream=True,
                                            extra_body=WORDS))  # fmt: skip
    for chunk in chunks:
        check("CreateCompletionStreamResponse", chunk.model_dump(mode="json", exclude_unset=True))
    streamed = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert streamed == logprobs.tokens


def test_n_choices_are_forks_of_one_prompt(client):
    """Choice i is seeded seed + i: each is exactly the single reply with that seed, so the
    forked KV cache holds exactly what evaluating the prompt again would."""
    fields = {"max_tokens": 8, "temperature": 1.0, "extra_body": WORDS}
    several = chat(client, n=3, seed=20, **fields)
    assert [c.index for c in several.choices] == [0, 1, 2]
    singles = [chat(client, seed=20 + i, **fields).choices[0].message.content for i in range(3)]
    assert [c.message.content for c in several.choices] == singles
    assert several.usage.completion_tokens == 24 and len(set(singles)) > 1
    chunks = stream(client, messages=ASK, n=3, seed=20, **fields)
    texts = ["", "", ""]
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == singles
    assert sorted(c.choices[0].index for c in chunks if c.choices[0].finish_reason) == [0, 1, 2]


def test_n_beyond_the_sequences_is_a_400_that_says_how_many(client):
    with pytest.raises(openai.BadRequestError) as caught:
        chat(client, n=4, max_tokens=2)
    assert caught.value.body["param"] == "n" and "at most 3" in caught.value.body["message"]


def test_an_assistant_message_last_is_continued(client):
    fields = {"max_tokens": 8, "temperature": 0, "extra_body": WORDS}
    whole = chat(client, **fields).choices[0].message.content
    words = whole.split(" ")
    head, rest = " ".join(words[:4]), " ".join(words[4:])
    continued = chat(client, messages=[*ASK, {"role": "assistant", "content": head}], **fields)
    assert continued.choices[0].message.content.startswith(" " + rest)


def test_min_tokens_mirostat_and_seeds(client):
    ends_now = {"logit_bias": {"2": 100}}  # the end of sequence, at once
    assert chat(client, max_tokens=5, extra_body=ends_now).usage.completion_tokens == 0
    held = chat(client, max_tokens=5, extra_body={**ends_now, "min_tokens": 3})
    assert held.usage.completion_tokens == 3
    miro = {"mirostat_mode": 2, "mirostat_tau": 3.0, **WORDS}
    one, two = (chat(client, max_tokens=6, seed=8, extra_body=miro) for _ in range(2))
    assert one.choices[0].message.content == two.choices[0].message.content
    again = [chat(client, max_tokens=6, seed=s, extra_body=WORDS) for s in (11, 11, 12)]
    texts = [r.choices[0].message.content for r in again]
    assert texts[0] == texts[1] != texts[2]


def test_a_finished_grammar_held_open_by_min_tokens_ends_the_reply(client, worker):
    """A grammar that is complete allows only the end of the reply; `min_tokens` holds the end
    off, so no allowed token is left: the reply ends there (accepting any other token made
    llama.cpp's grammar throw through ctypes and abort the worker, found by the fuzzing)."""
    fields = {"max_tokens": 6, "extra_body": {"grammar": 'root ::= "x"', "min_tokens": 4}}
    reply = chat(client, **fields)
    assert reply.choices[0].message.content == "x"
    assert reply.choices[0].finish_reason == "stop"
    assert worker.proc.poll() is None
    assert chat(client, max_tokens=2).choices[0].message.content is not None  # still serving


def test_penalties_change_the_reply(client):
    """presence/frequency/repeat penalties reach llama.cpp's penalties sampler (its
    constructor takes the vocabulary size first: a 500 for any penalty before)."""
    fields = {"max_tokens": 12, "temperature": 0, "extra_body": WORDS}
    plain = chat(client, **fields).choices[0].message.content
    for penalty in ({"presence_penalty": 2.0}, {"frequency_penalty": 2.0}):
        assert chat(client, **fields, **penalty).choices[0].message.content != plain
    repeat = {**fields, "extra_body": {**WORDS, "repeat_penalty": 3.0}}
    assert chat(client, **repeat).choices[0].message.content != plain


def test_echo_and_what_is_refused(worker):
    echoed = raw(worker, "/v1/completions", {"prompt": "hello", "max_tokens": 3, "echo": True,
                                             **WORDS}).json()  # fmt: skip
    text = echoed["choices"][0]["text"]
    assert text.startswith("hello") and len(text) > len("hello")
    for body, param in (
        ({"prompt": "hi", "suffix": "x"}, "suffix"),
        ({"prompt": "hi", "echo": True, "logprobs": 1}, "echo"),
    ):
        refused = raw(worker, "/v1/completions", body)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == param
    for body, param in (
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"tools": TOOLS, "grammar": 'root ::= "x"'}, "grammar"),
        ({"tool_choice": "required"}, "tool_choice"),
    ):
        refused = raw(worker, "/v1/chat/completions", {"messages": ASK, **body})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == param


# A template of the Hermes / Qwen family: it renders the tools, the calls and `tool` messages
HERMES_TEMPLATE = (
    "{% if tools %}<|system|>Tools:{% for t in tools %} {{ t | tojson }}{% endfor %}"
    " Call one in <tool_call></tool_call>.</s>{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>"
    "{{ c.function | tojson }}</tool_call>{% endfor %}{% else %}{{ m['content'] }}{% endif %}"
    "</s>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def hermes(tmp_path_factory):
    from support.ggufgen import write_llama_gguf

    folder = tmp_path_factory.mktemp("hermes")
    model = write_llama_gguf(folder / "hermes.gguf", chat_template=HERMES_TEMPLATE, seed=3)
    running = SlotWorker.start(model, folder / "slots", "--parallel", "1")
    yield running
    running.stop()


def test_a_template_that_knows_tools_renders_them_itself(hermes):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    client = openai.OpenAI(base_url=hermes.url + "/v1", api_key="unused", max_retries=0)
    first = client.chat.completions.create(
        model="tiny", messages=ASK, tools=TOOLS, tool_choice="required",
        parallel_tool_calls=False, max_tokens=300, temperature=0, extra_body=ASCII,
    )  # fmt: skip
    call = first.choices[0].message.tool_calls[0]
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    result = {"role": "tool", "tool_call_id": call.id, "content": "sunny"}
    history = [*ASK, first.choices[0].message.model_dump(exclude_none=True), result]
    counted = raw(hermes, "/llmup/prompt-tokens", {"messages": history, "tools": TOOLS}).json()
    # exactly the template's own rendering: tools, the call (arguments as an object), the result
    rendered = Jinja2ChatFormatter(HERMES_TEMPLATE, eos_token="</s>", bos_token="<s>")(
        messages=[
            ASK[0],
            {"role": "assistant", "content": "", "tool_calls": [{"id": call.id,
             "type": "function", "function": {"name": call.function.name,
             "arguments": json.loads(call.function.arguments)}}]},
            {"role": "tool", "content": "sunny", "tool_call_id": call.id},
        ],
        tools=TOOLS,
    ).prompt  # fmt: skip
    assert "Tools: " in rendered and "<tool_response>" not in rendered
    tokens = raw(hermes, "/extras/tokenize", {"input": rendered}).json()["tokens"]
    assert counted["prompt_tokens"] == len(tokens) - 1  # /extras/tokenize adds a BOS
    reply = client.chat.completions.create(
        model="tiny", messages=history, tools=TOOLS, max_tokens=4, extra_body=WORDS
    )
    assert reply.choices[0].message.content
