"""The request side of tools and JSON replies, without a model generating: what a request
asks (`reply_format`), the grammar llama.cpp's converter builds from it (parsed by llama.cpp
itself), the prompt a history of calls and results renders to (`chat_render`), and a reply
read back into text and calls as it streams (`tool_parser`, `worker_choices`)."""

from __future__ import annotations

import ctypes
import json
import re

import llama_cpp.llama_cpp as lib
import pytest
from support.worker_fixtures import write_chat_model

from launcher.grammar_ranges import bounds, integer_range
from launcher.json_grammar import reply_grammar
from launcher.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest
from launcher.proxy.gbnf_child import parse
from launcher.reply_format import (
    TOOL_OPEN,
    GrammarSpec,
    ReplyFormatError,
    format_call,
    grammar_spec,
    tool_use,
)
from launcher.workers.chat_render import TOOL_RESPONSE_OPEN, chat_turns, knows_tool_calls
from launcher.workers.choices import ChoiceOutput
from launcher.workers.generation import TokenEvent, TokenLogprob
from launcher.workers.llamacpp_slots.native import NativeModel, route_llama_logs
from launcher.workers.llamacpp_slots.sampling import grammar_sampler
from launcher.workers.tool_parser import ToolCallParser

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"],
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "now", "description": "The time"}},
]


def request(**fields) -> ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return ChatCompletionRequest.model_validate(body)


def test_tool_choice_decides_what_a_grammar_may_call():
    assert tool_use(request()) is None
    auto = tool_use(request(tools=TOOLS))
    assert auto.choice == "auto" and [t.name for t in auto.callable] == ["get_weather", "now"]
    assert auto.tools[1].parameters == {"type": "object", "properties": {}}
    assert tool_use(request(tools=TOOLS, tool_choice="none")).callable == ()
    named = {"type": "function", "function": {"name": "now"}}
    assert [t.name for t in tool_use(request(tools=TOOLS, tool_choice=named)).callable] == ["now"]
    legacy = tool_use(request(functions=[TOOLS[1]["function"]], function_call={"name": "now"}))
    assert legacy.legacy and legacy.forced and not legacy.parallel
    spec = grammar_spec(request(tools=TOOLS, tool_choice="required", parallel_tool_calls=False))
    assert spec.forced and not spec.parallel and GrammarSpec.from_json(spec.to_json()) == spec
    assert grammar_spec(request(tools=TOOLS, tool_choice="none")) is None


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": TOOLS, "functions": [TOOLS[1]["function"]]}, "functions"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "x"}}},
         "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS + TOOLS[:1]}, "tools"),
        ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
         "response_format"),
    ],
)  # fmt: skip
def test_requests_that_cannot_be_honoured_name_the_field(fields, param):
    with pytest.raises(ReplyFormatError) as caught:
        grammar_spec(request(**fields))
    assert caught.value.param == param


def test_the_grammars_parse_in_llama_cpp_and_only_auto_is_lazy():
    for fields, lazy in (
        ({"tools": TOOLS}, True),
        ({"tools": TOOLS, "tool_choice": "required"}, False),
        ({"tools": TOOLS, "response_format": {"type": "json_object"}}, False),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": WEATHER}}}, False),
    ):
        grammar = reply_grammar(grammar_spec(request(**fields)))
        assert parse(grammar.text), grammar.text
        assert grammar.lazy is lazy and bool(grammar.triggers) is lazy


def test_a_schema_the_converter_refuses_is_named_to_its_failing_part():
    broken = {"type": "object", "properties": {"a": {"type": "array", "items": {"type": "date"}}}}
    tools = [{"type": "function", "function": {"name": "f", "parameters": broken}}]
    with pytest.raises(ReplyFormatError) as caught:
        reply_grammar(grammar_spec(request(tools=tools)))
    assert caught.value.param == "tools.0.function.parameters.properties.a.items"
    assert "date" in str(caught.value)
    pattern = {"type": "json_schema", "json_schema": {"schema": {"type": "string", "pattern": "a"}}}
    with pytest.raises(ReplyFormatError) as caught:
        reply_grammar(grammar_spec(request(response_format=pattern)))
    assert caught.value.param == "response_format.json_schema.schema"


def test_a_property_with_only_a_description_takes_any_value():
    """Claude Code describes a tool's free-form argument without a type: any JSON value."""
    params = {"type": "object", "required": ["args"],
              "properties": {"args": {"description": "any value, passed verbatim"}}}  # fmt: skip
    tools = [{"type": "function", "function": {"name": "run", "parameters": params}}]
    grammar = reply_grammar(grammar_spec(request(tools=tools, tool_choice="required")))
    assert parse(grammar.text), grammar.text
    assert (
        "value"
        in dict(line.split(" ::= ", 1) for line in grammar.text.splitlines())["tool0-args-args-kv"]
    )


def test_huge_repetition_bounds_do_not_blow_the_grammar_up():
    """`maxLength: 524288` (Claude Code's Workflow script) spelled out is a 4 MB rule that
    crashes llama.cpp's parser: such a bound is left to the model; small ones are kept."""
    params = {"type": "object", "required": ["script", "tags", "name"], "properties": {
        "script": {"type": "string", "maxLength": 524288},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 100000},
        "name": {"type": "string", "maxLength": 5}}}  # fmt: skip
    tools = [{"type": "function", "function": {"name": "run", "parameters": params}}]
    grammar = reply_grammar(grammar_spec(request(tools=tools, tool_choice="required")))
    assert len(grammar.text) < 20_000 and parse(grammar.text)
    rules = dict(line.split(" ::= ", 1) for line in grammar.text.splitlines())
    assert rules["tool0-args-name"].count("char") == 5  # the small bound still holds


def test_two_tools_with_the_same_definition_name_keep_their_own_definitions():
    """llama.cpp's converter names a definition's rule by its last path segment alone."""

    def tool(name: str, kind: str) -> dict:
        value = {"type": "object", "properties": {"k": {"type": kind}}, "required": ["k"]}
        params = {"properties": {"x": {"$ref": "#/$defs/V"}}, "$defs": {"V": value}}
        return {"type": "function", "function": {"name": name, "parameters": params}}

    grammar = reply_grammar(
        grammar_spec(request(tools=[tool("a", "boolean"), tool("b", "integer")]))
    )
    rules = dict(line.split(" ::= ", 1) for line in grammar.text.splitlines())
    assert "boolean" in rules["tool0-V-k-kv"] and "integer" in rules["tool1-V-k-kv"]
    assert parse(grammar.text)


def test_an_auto_grammar_constrains_nothing_until_a_call_begins(tmp_path):
    """llama.cpp's lazy grammar with our trigger: free text, then only the call's text."""
    route_llama_logs(False)
    model = NativeModel_for(tmp_path)
    grammar = reply_grammar(grammar_spec(request(tools=TOOLS)))
    sampler = grammar_sampler(model, grammar.text, grammar.triggers)
    try:
        ends = sum(model.is_end(t) for t in range(model.vocab_size))
        assert len(_allowed(model, sampler)) == model.vocab_size - ends  # free text
        for token in model.tokenize("sure, " + TOOL_OPEN, add_special=False, parse_special=False):
            lib.llama_sampler_accept(sampler, token)
        allowed = {model.piece(t) for t in _allowed(model, sampler)}
        assert allowed and all(b"\n".startswith(piece[:1]) for piece in allowed), allowed
    finally:
        lib.llama_sampler_free(sampler)
        model.close()


def NativeModel_for(folder) -> NativeModel:  # noqa: N802 - reads as the constructor it wraps
    from launcher.workers.llamacpp_slots.native import ModelOptions

    return NativeModel(ModelOptions(write_chat_model(folder)))


def _allowed(model: NativeModel, sampler) -> list[int]:
    n = model.vocab_size
    data = (lib.llama_token_data * n)()
    for i in range(n):
        data[i].id, data[i].logit, data[i].p = i, 0.0, 0.0
    array = lib.llama_token_data_array(data, n, -1, False)
    lib.llama_sampler_apply(sampler, ctypes.byref(array))
    return [i for i in range(n) if data[i].logit > -1e30 and not model.is_end(i)]


def message(**fields) -> ChatMessage:
    return ChatMessage.model_validate(fields)


ARGUMENTS = '{"city": "Paris", "unit": "c"}'
CALL = {"id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": ARGUMENTS}}  # fmt: skip
HISTORY = [
    message(role="system", content="Be brief."),
    message(role="user", content="Weather in Paris?"),
    message(role="assistant", content=None, tool_calls=[CALL, {**CALL, "id": "call_2"}]),
    message(role="tool", tool_call_id="call_1", content="12 C"),
    message(role="tool", tool_call_id="call_2", content="54 F"),
]


def test_a_history_of_calls_renders_as_the_model_wrote_it():
    use = tool_use(request(tools=TOOLS))
    turns = chat_turns(HISTORY, use, native=False)
    roles = [m["role"] for m in turns.messages]
    assert roles == ["system", "user", "assistant", "user"] and turns.tools is None
    system = turns.messages[0]["content"]
    assert system.startswith("Be brief.\n\n") and json.dumps(TOOLS[0]) in system
    call = format_call("get_weather", CALL["function"]["arguments"])
    assert turns.messages[2]["content"] == call + "\n" + call
    assert turns.messages[3]["content"].count(TOOL_RESPONSE_OPEN) == 2
    # the same tools make the same system text: a session's prefix stays put
    again = chat_turns(HISTORY[:2], use, native=False)
    assert again.messages[0] == turns.messages[0]


def test_a_template_that_knows_tools_gets_them_and_the_calls():
    qwen_like = "{% for tool in tools %}{{ tool | tojson }}{% endfor %}<tool_call>"
    assert knows_tool_calls(qwen_like) and not knows_tool_calls("{{ messages }}")
    turns = chat_turns(HISTORY, tool_use(request(tools=TOOLS)), native=True)
    assert turns.tools[0]["function"]["name"] == "get_weather"
    calls = turns.messages[2]["tool_calls"]
    assert calls[0]["function"]["arguments"] == {"city": "Paris", "unit": "c"}
    assert turns.messages[3] == {"role": "tool", "content": "12 C", "tool_call_id": "call_1"}


def test_an_assistant_message_last_is_a_reply_to_continue():
    turns = chat_turns(
        [message(role="user", content="Count"), message(role="assistant", content="1, 2,")],
        None,
        native=False,
    )
    assert turns.prefill == "1, 2," and [m["role"] for m in turns.messages] == ["user"]
    with pytest.raises(ValueError, match="tool results"):
        chat_turns(HISTORY[:3], None, native=False)


def test_calls_are_read_out_of_a_stream_cut_anywhere():
    arguments = '{"q": "a } \\" {", "n": [1, {"m": 2}]}'
    text = "Looking.\n" + format_call("search", arguments) + "\n" + format_call("now", "{}")
    for size in (1, 2, 5, len(text)):
        parser = ToolCallParser()
        items = [i for k in range(0, len(text), size) for i in parser.feed(text[k : k + size])]
        items += parser.close()
        assert "".join(i for i in items if isinstance(i, str)) == "Looking.\n"
        assert [(c.name, c.arguments, c.complete) for c in parser.calls] == [
            ("search", arguments, True),
            ("now", "{}", True),
        ]
        starts = [i for i in items if not isinstance(i, str) and i.id]
        assert [s.arguments for s in starts] == ["", ""] and starts[0].id != starts[1].id
    parser = ToolCallParser()
    assert parser.feed("a <tool") == ["a "] and parser.held == len("<tool")
    assert parser.feed("box>") == ["<toolbox>"]


def _event(text: str, finish: str | None = None) -> TokenEvent:
    return TokenEvent(text, 1, finish, logprobs=(TokenLogprob(text, tuple(text.encode()), -1.0),))


def test_a_stop_string_cuts_the_text_and_its_tokens_logprobs():
    output = ChoiceOutput(0, ["END"], tools=False)
    deltas = [output.feed(_event(t)) for t in ("one ", "two E", "N", "D three")]
    assert output.content == "one two " and output.finish_reason == "stop"
    assert [e.token for e in output.logprobs] == ["one ", "two E"]
    assert [e.token for d in deltas for e in d.logprobs] == ["one ", "two E"]


def test_a_stop_string_never_cuts_a_call():
    output = ChoiceOutput(0, ['"'], tools=True)
    for piece in (format_call("now", '{"a": "b"}'), ""):
        output.feed(TokenEvent(piece, 1, "stop" if not piece else None))
    assert output.calls[0].arguments == '{"a": "b"}' and output.finish_reason == "stop"


def _as_regex(expression: str) -> re.Pattern:
    """A GBNF expression of digit classes, literals and groups read as a Python regex."""
    return re.compile(re.sub(r'"(-|\d)"', r"\1", expression).replace(" ", ""))


@pytest.mark.parametrize(
    ("low", "high"),
    [(1, None), (None, 10), (-5, 37), (0, 0), (100, 1234), (-1234, -100), (19, 2100), (0, 99)],
)
def test_integer_bounds_become_exactly_those_integers(low, high):
    pattern = _as_regex(integer_range(low, high))
    start = -3000 if low is None else low - 150
    stop = 3000 if high is None else high + 150
    for n in range(start, stop):
        inside = (low is None or n >= low) and (high is None or n <= high)
        assert bool(pattern.fullmatch(str(n))) is inside, n
    assert not pattern.fullmatch("07") and not pattern.fullmatch("-0")
    assert integer_range(5, 4) is None


def test_integer_bounds_are_enforced_in_a_grammar():
    schema = {"type": "integer", "exclusiveMinimum": 0, "maximum": 31.5}
    assert bounds(schema) == (1, 31) and bounds({"type": "integer"}) is None
    spec = grammar_spec(
        request(response_format={"type": "json_schema", "json_schema": {"schema": schema}})
    )
    grammar = reply_grammar(spec).text
    assert parse(grammar) and "[1-9]" in grammar and '"3" ( [0-1] )' in grammar


@pytest.mark.parametrize("prompt", ["", []])
def test_echo_of_an_empty_prompt_is_sent_as_no_echo(prompt):
    """llama_cpp.server answers `echo` with an empty prompt with a 500 (found by the schema
    fuzzing); echoing nothing adds nothing, so the request is sent without it."""
    empty = CompletionRequest(model="m", prompt=prompt, echo=True)
    assert empty.model_dump(exclude_unset=True)["echo"] is False
    assert CompletionRequest(model="m", prompt="hi", echo=True).echo is True
