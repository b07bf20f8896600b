"""Extract schemas from OpenAI's published OpenAPI document into a JSON Schema 2020-12 file.

Run by hand when the vendored schemas are refreshed (never by the tests):

    git clone https://github.com/openai/openai-openapi && cd openai-openapi
    python tests/support/vendor_openai_schemas.py openapi.json COMMIT DATE OUT.json NAME...

Each named schema and everything it references is copied from `components.schemas`, its
`$ref`s pointed at `#/$defs/...`, `nullable: true` turned into a type list (or an `anyOf`
with `{"type": "null"}`), and `discriminator`, `example` and `x-*` keys dropped.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

PREFIX = "#/components/schemas/"
DROPPED = {"discriminator", "example", "examples"}


def convert(node: Any, found: set[str]) -> Any:
    """`node` as JSON Schema 2020-12; names of the schemas it references go into `found`."""
    if isinstance(node, list):
        return [convert(item, found) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in DROPPED or key.startswith("x-") or key == "nullable":
            continue
        if key == "$ref" and isinstance(value, str) and value.startswith(PREFIX):
            name = value[len(PREFIX) :]
            found.add(name)
            out[key] = f"#/$defs/{name}"
            continue
        out[key] = convert(value, found) if key not in ("enum", "const", "default") else value
    if node.get("nullable") is True:
        return _nullable(out)
    return out


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    kind = schema.get("type")
    if isinstance(kind, str) and "$ref" not in schema:
        schema["type"] = [kind, "null"]
        if "enum" in schema and None not in schema["enum"]:
            schema["enum"] = [*schema["enum"], None]
        return schema
    return {"anyOf": [schema, {"type": "null"}]}


def extract(document: dict[str, Any], names: list[str]) -> dict[str, Any]:
    schemas = document["components"]["schemas"]
    defs: dict[str, Any] = {}
    pending = list(names)
    while pending:
        name = pending.pop()
        if name in defs:
            continue
        found: set[str] = set()
        defs[name] = convert(schemas[name], found)
        pending += sorted(found - defs.keys())
    return dict(sorted(defs.items()))


def main(argv: list[str]) -> None:
    source, commit, date, out, *names = argv
    document = json.loads(Path(source).read_text())
    result = {
        "source": {
            "repository": "https://github.com/openai/openai-openapi",
            "file": "openapi.json",
            "commit": commit,
            "commit_date": date,
            "info.version": document["info"]["version"],
            "openapi": document["openapi"],
            "conversion": (
                "OpenAPI -> JSON Schema 2020-12 by tests/support/vendor_openai_schemas.py: "
                "$ref #/components/schemas/X -> #/$defs/X; `nullable: true` -> type list or "
                "anyOf [schema, {type: null}]; discriminator, example(s) and x-* keys dropped."
            ),
            "schemas": names,
        },
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$defs": extract(document, names),
    }
    Path(out).write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
