"""The child process that parses GBNF grammars with llama.cpp's own parser.

Run as ``python -m launcher.proxy.gbnf_child`` by `launcher.proxy.grammar.GrammarChecker`;
it reads one JSON line per request on stdin, ``{"grammar": GBNF}``, ``{"schema": JSON schema
text}`` or ``{"spec": GrammarSpec JSON}``, and answers one JSON line on stdout: ``{"ok":
true}`` or ``{"ok": false, "error": "...", "param": ...}``. It calls
`llama_sampler_init_grammar` exactly as llama-cpp-python's sampler does (without a
vocabulary, which only token references by text need), so "parses here" means "parses in the
backend". A schema is first converted to GBNF with llama-cpp-python's own
`json_schema_to_gbnf`, as its chat handlers do for `response_format.schema` and tool
parameters; when that conversion fails they fall back to a plain JSON grammar, so only a
conversion that succeeds needs its result parsed. A spec (the tools and JSON reply of a
request to llmup's slot worker) is built into the very grammar that worker builds
(`launcher.json_grammar.reply_grammar`); a schema the converter refuses is an error naming
its part, since the worker refuses it the same way. The parser reports errors on stderr, so
stderr is a file read back after each request. Anything that crashes or hangs the parser
takes down only this process; the checker starts another.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import llama_cpp
from llama_cpp.llama_grammar import json_schema_to_gbnf

from launcher.json_grammar import reply_grammar
from launcher.reply_format import GrammarSpec, ReplyFormatError

ROOT = b"root"
MAX_ERROR_CHARS = 300


def parse(grammar: str) -> bool:
    """True when llama.cpp builds a grammar sampler from `grammar` (then freed again)."""
    sampler = llama_cpp.llama_sampler_init_grammar(None, grammar.encode("utf-8"), ROOT)
    if not sampler:
        return False
    llama_cpp.llama_sampler_free(sampler)
    return True


def reason(output: str) -> str:
    """llama.cpp's own words for why a grammar failed, from what it wrote on stderr."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in lines:
        if "error parsing grammar:" in line:
            return line.split("error parsing grammar:", 1)[1].strip()[:MAX_ERROR_CHARS]
    for line in lines:
        if "grammar" in line and line != "failed to parse grammar":
            return line[:MAX_ERROR_CHARS]
    return "llama.cpp's grammar parser refused it"


def grammar_of(request: dict) -> str | None:
    """The GBNF a request stands for; None for a schema the backend would not convert."""
    if "grammar" in request:
        return request["grammar"]
    if "spec" in request:
        return reply_grammar(GrammarSpec.from_json(request["spec"])).text
    try:
        return json_schema_to_gbnf(request["schema"])
    except Exception:  # llama-cpp-python falls back to its JSON grammar here too
        return None


def check(request: dict, capture) -> dict:
    try:
        grammar = grammar_of(request)
    except ReplyFormatError as exc:
        return {"ok": False, "error": str(exc), "param": exc.param}
    if grammar is None:
        return {"ok": True}
    capture.seek(0)
    capture.truncate()
    if parse(grammar):
        return {"ok": True}
    capture.seek(0)
    return {"ok": False, "error": reason(capture.read())}


def serve(stdin, stdout, capture) -> None:
    """Answer each request line until stdin closes; `capture` is the file behind fd 2."""
    for line in stdin:
        stdout.write(json.dumps(check(json.loads(line), capture)) + "\n")
        stdout.flush()


def main() -> None:
    with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as capture:
        os.dup2(capture.fileno(), 2)
        serve(sys.stdin, sys.stdout, capture)


if __name__ == "__main__":
    main()
