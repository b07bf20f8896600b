"""Which JSON schemas the exllamav2 worker can make a reply follow, checked before generating.

The worker constrains replies with lm-format-enforcer's `JsonSchemaParser`
(`exllamav2.json_filter`). That parser meets some schema parts only while generating, and then
fails quietly: the reply ends mid-JSON. So every schema is walked here first, on the request
thread, and what the parser cannot build is a `ReplyFormatError` naming its place in the
request (`response_format.json_schema.schema.properties.when.$ref`), a 400 before anything
streams. The walk follows lm-format-enforcer 0.11's own dispatch (`jsonschemaparser.get_parser`):

- built: `type` (one or a list), `properties` / `required`, `additionalProperties` (of a
  map without `properties`), `items`, `minItems` / `maxItems`, `enum` (all strings or all
  numbers), `const` (a string or a number), `anyOf`, `allOf` and `oneOf` of objects,
  `minLength` or a `pattern` on strings, `$ref` into the root's `$defs` /
  `definitions`;
- not enforced: bounds on numbers, `maxLength` (0.11.3 lets a string run one character
  past it when the closing quote comes in the same token), `format`, `uniqueItems`,
  `patternProperties`, `not`, `if` / `then` / `else` and the like. With `strict: true`
  (OpenAI's promise that the reply validates) each is a 400; without, the reply is valid
  JSON of the schema's shape and these are left to the model, as OpenAI's non-strict
  mode does;
- a sub-schema without a `type` gets the one it implies before the parser sees it
  (`normalized`): an object with `properties`, an array with `items`, else any JSON value
  (`{}`, common in tool parameters).
"""

from __future__ import annotations

from typing import Any

from launcher.reply_format import ReplyFormatError

ANY_VALUE = {"anyOf": [{"type": t} for t in ("object", "array", "string", "number", "boolean",
                                              "null")]}  # fmt: skip
TYPES = {"object", "array", "string", "integer", "number", "boolean", "null"}
SHAPES = {"type", "enum", "const", "anyOf", "allOf", "oneOf", "$ref"}
BUILT = SHAPES | {"properties", "required", "additionalProperties", "items", "minItems",
                  "maxItems", "minLength", "pattern", "$defs", "definitions"}  # fmt: skip
ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id", "$comment",
               "deprecated", "readOnly", "writeOnly", "name", "strict"}  # fmt: skip
DEF_PREFIXES = ("#/$defs/", "#/definitions/")


def normalized(schema: Any) -> Any:
    """The schema with every shapeless sub-schema (`{}`, annotations only) as any value."""
    if isinstance(schema, list):
        return [normalized(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {**schema, **_implied_type(schema)}
    for key, value in out.items():
        if key in ("properties", "$defs", "definitions") and isinstance(value, dict):
            out[key] = {name: normalized(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "anyOf", "allOf", "oneOf"):
            out[key] = normalized(value)
        else:
            out[key] = value
    return out


def _implied_type(schema: dict[str, Any]) -> dict[str, Any]:
    """What a sub-schema without `type` (or another shape) means: an object when it has
    `properties`, an array when it has `items`, else any value (its other keywords stay, for
    the `strict` check to see)."""
    if SHAPES & schema.keys():
        return {}
    if "properties" in schema or "additionalProperties" in schema:
        return {"type": "object"}
    if "items" in schema:
        return {"type": "array"}
    return ANY_VALUE


def check_schema(schema: dict[str, Any], param: str, *, strict: bool = False) -> None:
    """ReplyFormatError naming the first part lm-format-enforcer cannot build (or, with
    `strict`, does not enforce); `schema` is `normalized` already."""
    if not isinstance(schema, dict):
        raise ReplyFormatError(f"`{param}` must be a JSON schema object", param)
    defs = {**schema.get("definitions", {}), **schema.get("$defs", {})}
    _SchemaWalk(defs, strict).check(schema, param)


class _SchemaWalk:
    """One walk over a schema; `defs` are the root's definitions, the only `$ref` targets."""

    def __init__(self, defs: dict[str, Any], strict: bool) -> None:
        self.defs, self.strict, self.seen = defs, strict, set()

    def check(self, schema: Any, where: str) -> None:
        if not isinstance(schema, dict):
            raise ReplyFormatError(f"`{where}` must be a JSON schema object", where)
        self._keywords(schema, where)
        if "$ref" in schema:
            self._ref(schema["$ref"], f"{where}.$ref")
        for key in ("anyOf", "allOf", "oneOf"):
            self._options(schema, key, where)
        self._type(schema, where)
        self._values(schema, where)
        self._children(schema, where)

    def _keywords(self, schema: dict[str, Any], where: str) -> None:
        for key in schema:
            if key not in BUILT and key not in ANNOTATIONS and self.strict:
                raise ReplyFormatError(
                    f"`{where}.{key}` is not enforced by the exllamav2 backend's JSON filter "
                    "(lm-format-enforcer), so `strict: true` cannot be promised; leave out the "
                    "keyword, or `strict`",
                    f"{where}.{key}",
                )

    def _ref(self, ref: Any, where: str) -> None:
        name = next((ref[len(p) :] for p in DEF_PREFIXES if str(ref).startswith(p)), None)
        if name is None or "/" in name or name not in self.defs:
            raise ReplyFormatError(
                f"`{where}` must point into the schema's own `$defs` (`#/$defs/NAME`); "
                f"{ref!r} is not supported by the exllamav2 backend",
                where,
            )
        if name not in self.seen:  # a recursive definition is checked once
            self.seen.add(name)
            self.check(self.defs[name], f"{where}({name})")

    def _options(self, schema: dict[str, Any], key: str, where: str) -> None:
        if key not in schema:
            return
        options = schema[key]
        if not isinstance(options, list) or not options:
            raise ReplyFormatError(f"`{where}.{key}` must be a non-empty list", f"{where}.{key}")
        for i, option in enumerate(options):
            self.check(option, f"{where}.{key}.{i}")
            if key != "anyOf" and not _is_object(option):
                raise ReplyFormatError(
                    f"`{where}.{key}.{i}`: the exllamav2 backend's JSON filter combines only "
                    f"object schemas with `{key}` (use `anyOf`)",
                    f"{where}.{key}.{i}",
                )

    def _type(self, schema: dict[str, Any], where: str) -> None:
        kind = schema.get("type")
        kinds = kind if isinstance(kind, list) else [kind] if kind is not None else []
        if any(k not in TYPES for k in kinds) or (isinstance(kind, list) and not kind):
            raise ReplyFormatError(f"`{where}.type` {kind!r} is not a JSON schema type", where)
        if isinstance(kind, list) and self.strict and set(schema) & (BUILT - {"type"}):
            raise ReplyFormatError(
                f"`{where}`: with a list of types, the exllamav2 backend's JSON filter enforces "
                "only the types (use `anyOf` of full schemas under `strict: true`)",
                f"{where}.type",
            )
        if schema.get("pattern") is not None and {"minLength", "maxLength"} & schema.keys():
            raise ReplyFormatError(
                f"`{where}`: a `pattern` with `minLength` / `maxLength` is not supported by the "
                "exllamav2 backend's JSON filter (put the length in the pattern)",
                f"{where}.pattern",
            )
        missing = set(schema.get("required", [])) - set(schema.get("properties") or {})
        if missing and "properties" in schema:
            raise ReplyFormatError(
                f"`{where}.required` names {sorted(missing)[0]!r}, which is not among its "
                "`properties`",
                f"{where}.required",
            )

    def _values(self, schema: dict[str, Any], where: str) -> None:
        if "const" in schema and type(schema["const"]) not in (str, int, float):
            raise ReplyFormatError(
                f"`{where}.const` must be a string or a number on the exllamav2 backend",
                f"{where}.const",
            )
        if "enum" in schema:
            values = schema["enum"]
            strings = all(type(v) is str for v in values)
            numbers = all(type(v) in (int, float) for v in values)
            if not isinstance(values, list) or not values or not (strings or numbers):
                raise ReplyFormatError(
                    f"`{where}.enum` must list only strings or only numbers on the exllamav2 "
                    "backend",
                    f"{where}.enum",
                )

    def _children(self, schema: dict[str, Any], where: str) -> None:
        for name, sub in (schema.get("properties") or {}).items():
            self.check(sub, f"{where}.properties.{name}")
        for key in ("items", "additionalProperties"):
            if isinstance(schema.get(key), dict):
                self.check(schema[key], f"{where}.{key}")
            elif key == "items" and key in schema:
                raise ReplyFormatError(
                    f"`{where}.items` must be one schema on the exllamav2 backend", f"{where}.items"
                )


def _is_object(schema: Any) -> bool:
    return isinstance(schema, dict) and schema.get("type") == "object"
