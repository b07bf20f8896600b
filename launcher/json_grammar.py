"""A reply's llama.cpp grammar, built from JSON schemas by llama.cpp's own converter.

`reply_grammar(spec)` turns a `GrammarSpec` (`launcher.reply_format`: the tools a reply may
call, whether it must, the JSON it must be) into GBNF with llama.cpp's json-schema-to-grammar
converter in the copy llama-cpp-python ships (`llama_cpp.llama_grammar.SchemaConverter`),
one converter for the whole grammar so the rules of several tools live side by side (each
tool's `$defs` renamed apart first: the converter names a definition's rule by its last path
segment). A call is the fixed text of `reply_format.format_call` around the arguments rule
of one of the tools (strings without raw control characters, which JSON forbids, and
integers within their `minimum` / `maximum`, which the converter ignores:
`launcher.grammar_ranges`); with `tool_choice` `auto` and no JSON reply the grammar is lazy: text is
free until the model writes `<tool_call>` (llama.cpp's trigger pattern), then the call is
forced, as llama.cpp's server does for the Hermes 2 Pro format.

A schema (or a part of one) the converter cannot handle is a `ReplyFormatError` naming its
place in the request (`tools.0.function.parameters.properties.when`): the converter is tried
on each sub-schema in turn to find the deepest part that fails on its own.

Both the slot worker (to sample with it) and the proxy's grammar checker child (to parse it
with llama.cpp before the worker ever sees it: a grammar that crashes llama.cpp's parser
takes down only that child) call `reply_grammar`, so "parses in the checker" means "parses
in the worker". This module imports llama_cpp; only those two processes import it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from llama_cpp.llama_grammar import PRIMITIVE_RULES, RESERVED_NAMES, SchemaConverter

from launcher.grammar_ranges import bounds, integer_range
from launcher.reply_format import (
    ARGS_KEY,
    CALL_HEAD,
    CALL_SEPARATOR,
    CALL_TAIL,
    TOOL_OPEN,
    GrammarSpec,
    ReplyFormatError,
    ToolDef,
)

# A JSON string's character: llama-cpp-python's converter lets control characters through,
# which JSON forbids unescaped (Python's json.loads refuses them); llama.cpp's current
# converter excludes them as here.
JSON_CHAR = (
    r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F]'
    r" [0-9a-fA-F])"
)
# llama.cpp searches the text generated so far for it (regex_search); the grammar applies
# from the match on. A leading `[\s\S]*?` would only add backtracking on every token.
TRIGGER_PATTERN = TOOL_OPEN
MAX_REASON_CHARS = 200
_DEFS = ("$defs", "definitions")


@dataclass(frozen=True)
class ReplyGrammar:
    """GBNF text; `lazy`: inactive until one of `triggers` (regexes) matches the output."""

    text: str
    lazy: bool = False
    triggers: tuple[str, ...] = ()


def reply_grammar(spec: GrammarSpec) -> ReplyGrammar:
    """The grammar a reply follows (see the module docstring)."""
    converter = _converter()
    alternatives = []
    if spec.tools:
        alternatives.append(_calls_rule(converter, spec))
    if spec.json is not None:
        schema = spec.json.schema if spec.json.schema is not None else {"type": "object"}
        alternatives.append(_schema_rule(converter, schema, "reply", spec.json.param))
    if not alternatives:
        raise ValueError("an empty GrammarSpec has no grammar")
    # a space may lead (Llama-2's format puts one before every answer; a forced reply that
    # may not write it would never match its own history in the next turn's prompt)
    converter._add_rule("root", f'" "? ( {" | ".join(alternatives)} )')
    if "char" in converter._rules:
        converter._rules["char"] = JSON_CHAR
    lazy = bool(spec.tools) and not spec.forced and spec.json is None
    return ReplyGrammar(converter.format_grammar(), lazy, (TRIGGER_PATTERN,) if lazy else ())


# Keywords that describe a value without constraining it: a schema of these alone accepts
# any JSON value (Claude Code's tools have such properties: "args", with only a description);
# llama-cpp-python's converter refuses them ("Unrecognized schema").
ANNOTATIONS = frozenset(
    {"description", "title", "default", "examples", "$comment", "deprecated", "readOnly",
     "writeOnly"}
)  # fmt: skip


# The converter spells a bounded repetition out (`maxLength: 524288` is half a million
# nested optional chars, a 4 MB rule that crashes llama.cpp's grammar parser: Claude Code's
# Workflow tool has one); bounds above this are left to the model, as if absent.
MAX_SPELLED_REPEAT = 1024
REPEAT_BOUNDS = ("maxLength", "maxItems")


class _Converter(SchemaConverter):
    """llama-cpp-python's converter, with the integer bounds it ignores enforced, a schema
    of annotations alone read as any value, and huge repetition bounds left out."""

    def visit(self, schema: Any, name: str) -> str:
        if isinstance(schema, dict) and set(schema) <= ANNOTATIONS and schema:
            return self._add_primitive("value", PRIMITIVE_RULES["value"])
        if isinstance(schema, dict) and any(
            isinstance(schema.get(k), int) and schema[k] > MAX_SPELLED_REPEAT for k in REPEAT_BOUNDS
        ):
            schema = {
                k: v for k, v in schema.items()
                if not (k in REPEAT_BOUNDS and isinstance(v, int) and v > MAX_SPELLED_REPEAT)
            }  # fmt: skip
        limits = bounds(schema) if isinstance(schema, dict) else None
        if schema.get("type") != "integer" or limits is None or _has_other_shape(schema):
            return super().visit(schema, name)
        expression = integer_range(*limits)
        if expression is None:
            raise ValueError(f"no integer lies within the bounds {limits}")
        rule_name = name + "-" if name in RESERVED_NAMES else name or "root"
        return self._add_rule(rule_name, f"{expression} space")


def _has_other_shape(schema: dict[str, Any]) -> bool:
    """A union, a reference, a constant or a list of values decides the shape first."""
    return any(key in schema for key in ("$ref", "anyOf", "oneOf", "const", "enum"))


def _converter() -> SchemaConverter:
    return _Converter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)


def _literal(converter: SchemaConverter, text: str) -> str:
    return converter._format_literal(text)


def _calls_rule(converter: SchemaConverter, spec: GrammarSpec) -> str:
    """One call of any of the tools; several (one per line) when parallel calls are allowed."""
    alternatives = [
        f"{_literal(converter, tool.name + ARGS_KEY)} {_arguments_rule(converter, i, tool)}"
        for i, tool in enumerate(spec.tools)
    ]
    head, tail = _literal(converter, CALL_HEAD), _literal(converter, CALL_TAIL)
    call = converter._add_rule("tool-call", f"{head} ( {' | '.join(alternatives)} ) {tail}")
    if not spec.parallel:
        return call
    return f"{call} ( {_literal(converter, CALL_SEPARATOR)} {call} )*"


def _arguments_rule(converter: SchemaConverter, index: int, tool: ToolDef) -> str:
    schema = _defs_apart(tool.parameters, f"tool{index}-")
    return _schema_rule(converter, schema, f"tool{index}-args", tool.param)


def _schema_rule(converter: SchemaConverter, schema: Any, name: str, param: str) -> str:
    """The rule for JSON of `schema`; a schema the converter refuses names its failing part."""
    if not isinstance(schema, dict):
        raise ReplyFormatError(f"`{param}` must be a JSON schema (an object)", param)
    try:
        resolved = converter.resolve_refs(copy.deepcopy(schema), name)
        return converter.visit(resolved, name)
    except Exception as exc:  # the converter raises asserts, ValueErrors, KeyErrors...
        where = param + _failing_part(schema, schema)
        reason = (str(exc) or type(exc).__name__)[:MAX_REASON_CHARS]
        raise ReplyFormatError(
            f"`{where}` is not a JSON schema llama.cpp's grammar converter can handle: {reason}",
            where,
        ) from None


def _defs_apart(schema: Any, prefix: str) -> Any:
    """`schema` with its local definitions (and the refs to them) renamed with `prefix`."""
    if not isinstance(schema, dict) or not any(key in schema for key in _DEFS):
        return schema

    def rename(node: Any) -> Any:
        if isinstance(node, list):
            return [rename(item) for item in node]
        if not isinstance(node, dict):
            return node
        out = {key: rename(value) for key, value in node.items()}
        ref = out.get("$ref")
        for key in _DEFS:
            if isinstance(ref, str) and ref.startswith(f"#/{key}/"):
                out["$ref"] = f"#/{key}/{prefix}{ref[len(key) + 3 :]}"
        return out

    renamed = rename(schema)
    for key in _DEFS:
        if isinstance(renamed.get(key), dict):
            renamed[key] = {f"{prefix}{name}": value for name, value in renamed[key].items()}
    return renamed


def _children(schema: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """(path suffix, sub-schema) for every sub-schema directly inside `schema`."""
    for key in ("properties", "patternProperties", *_DEFS):
        if isinstance(schema.get(key), dict):
            for name, child in schema[key].items():
                yield f".{key}.{name}", child
    for key in ("anyOf", "oneOf", "allOf", "prefixItems", "items"):
        if isinstance(schema.get(key), list):
            for i, child in enumerate(schema[key]):
                yield f".{key}.{i}", child
    for key in ("items", "additionalProperties", "not"):
        if key in schema and not isinstance(schema[key], (list, bool)):
            yield f".{key}", schema[key]


def _failing_part(schema: Any, root: dict[str, Any]) -> str:
    """The path (from `schema`) of the deepest sub-schema that fails to convert on its own."""
    if not isinstance(schema, dict):
        return ""
    for suffix, child in _children(schema):
        if not _converts(child, root):
            return suffix + _failing_part(child, root)
    return ""


def _converts(schema: Any, root: dict[str, Any]) -> bool:
    if not isinstance(schema, dict):
        return False
    trial = dict(schema)
    for key in _DEFS:
        if trial and key in root:
            trial.setdefault(key, root[key])
    converter = _converter()
    try:
        converter.visit(converter.resolve_refs(copy.deepcopy(trial), "part"), "part")
    except Exception:
        return False
    return True
