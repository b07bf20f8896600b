"""Grammars are parsed before they reach the backend, by llama.cpp's parser in a child.

llama-cpp-python hands a grammar to `llama_sampler_init_grammar`; when llama.cpp cannot
parse it, that returns NULL, llama-cpp-python adds the NULL to its sampler chain, and the
backend dies with SIGSEGV on the next sample (`"grammar": "root ::= ("` or
`"root ::= foo"`). A few such requests used to exhaust the supervisor's restart budget.
So every grammar llmup would forward is first parsed by the same parser in
`launcher.proxy.gbnf_child`, a long-lived child process: the `grammar` field, and the
grammars the backend builds from JSON schemas (the exllamav2 worker builds none: it checks
schemas against its own filter). For llama_cpp.server those are one per
schema (`response_format.schema`, each tool's or function's parameters); llmup's slot worker
builds one grammar from the request's tools and JSON reply together
(`launcher.json_grammar.reply_grammar`), and the child builds exactly that one. A grammar it
refuses is a 400 naming the field (a schema the converter cannot handle names its failing
part), and one that crashes or hangs the parser costs only that child.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

from launcher.errors import BadRequestError
from launcher.reply_format import ReplyFormatError, grammar_spec
from launcher.served import WorkerKind

log = logging.getLogger(__name__)

CHECK_TIMEOUT_S = 10.0
CACHE_SIZE = 1024
CHILD = [sys.executable, "-m", "launcher.proxy.gbnf_child"]


def grammar_requests(
    body: Any, kind: WorkerKind = WorkerKind.LLAMACPP_PYTHON
) -> Iterator[tuple[str, dict[str, str]]]:
    """(param, child request) for each grammar the backend `kind` would build from `body`:
    llmup's slot worker builds one from the tools and the JSON reply together
    (`launcher.json_grammar`), llama_cpp.server one per schema."""
    if getattr(body, "grammar", None) is not None:
        yield "grammar", {"grammar": body.grammar}
    if kind is WorkerKind.EXLLAMAV2:
        return  # no GBNF: its worker checks the schemas against its own JSON filter
    if kind is WorkerKind.LLAMACPP_SLOTS:
        try:
            spec = grammar_spec(body)
        except ReplyFormatError as exc:
            raise BadRequestError(str(exc), param=exc.param) from None
        if spec is not None:
            yield "tools" if spec.tools else spec.json.param, {"spec": spec.to_json()}
        return
    response_format = getattr(body, "response_format", None)
    schema = response_format.schema()[1] if response_format else None
    if schema is not None and response_format.type != "text":
        yield "response_format.schema", {"schema": json.dumps(schema)}
    for i, tool in enumerate(getattr(body, "tools", None) or []):
        param = f"tools.{i}.function.parameters"
        yield param, {"schema": json.dumps(tool.function.parameters)}
    for i, function in enumerate(getattr(body, "functions", None) or []):
        yield f"functions.{i}.parameters", {"schema": json.dumps(function.parameters)}


class GrammarChecker:
    """One child parser at a time, started on first use and again after it dies."""

    def __init__(self, *, timeout_s: float = CHECK_TIMEOUT_S, command: list[str] = CHILD) -> None:
        self.timeout_s = timeout_s
        self.command = command
        self._proc: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()
        self._verdicts: OrderedDict[str, tuple[str, str | None] | None] = OrderedDict()

    async def check_request(self, body: Any, kind: WorkerKind = WorkerKind.LLAMACPP_PYTHON) -> None:
        """BadRequestError naming the field of the first grammar llama.cpp would refuse."""
        for param, request in grammar_requests(body, kind):
            verdict = await self.verdict(request)
            if verdict is None:
                continue
            error, where = verdict
            if "spec" in request and where:  # the converter refused a schema: named
                raise BadRequestError(error, param=where, code="invalid_schema")
            raise BadRequestError(
                f"`{param}` is not a grammar llama.cpp can use: {error}",
                param=param,
                code="invalid_grammar",
            )

    async def verdict(self, request: dict[str, str]) -> tuple[str, str | None] | None:
        """None when llama.cpp accepts the grammar, else its reason and the failing part of
        a schema when the child names one (cached by content)."""
        key = json.dumps(request, sort_keys=True)
        if key in self._verdicts:
            self._verdicts.move_to_end(key)
            return self._verdicts[key]
        async with self._lock:
            verdict = await self._ask(key)
        self._verdicts[key] = verdict
        if len(self._verdicts) > CACHE_SIZE:
            self._verdicts.popitem(last=False)
        return verdict

    async def _ask(self, line: str) -> tuple[str, str | None] | None:
        proc = await self._child()
        try:
            proc.stdin.write(line.encode("utf-8") + b"\n")
            await proc.stdin.drain()
            answer = await asyncio.wait_for(proc.stdout.readline(), self.timeout_s)
            reply = json.loads(answer)
        except (OSError, ValueError, asyncio.TimeoutError) as exc:
            log.warning("the grammar parser failed on a grammar (%r); starting a new one", exc)
            await self._stop()
            return "it crashed or hung llama.cpp's grammar parser", None
        if reply.get("ok"):
            return None
        return str(reply.get("error") or "refused"), reply.get("param")

    async def _child(self) -> asyncio.subprocess.Process:
        if self._proc is None or self._proc.returncode is not None:
            self._proc = await asyncio.create_subprocess_exec(
                *self.command,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
            )
        return self._proc

    async def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()

    async def aclose(self) -> None:
        async with self._lock:
            await self._stop()
