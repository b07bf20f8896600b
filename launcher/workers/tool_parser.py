"""A reply split into text and tool calls as it streams, in OpenAI's delta shapes.

The model writes calls in the one format of `launcher.reply_format` (a grammar makes it):

    <tool_call>
    {"name": "NAME", "arguments": ARGUMENTS}
    </tool_call>

`ToolCallParser.feed` takes the reply's text piece by piece and returns what can be told so
far: text (content) and `CallDelta`s. A call's first delta carries its index, a new id and its
name (as soon as the name is complete), the next ones the arguments as they are written, so a
client sees a call the way OpenAI streams one. Text that may be the start of `<tool_call>` is
held back until it is known not to be. The arguments are the model's own JSON text, character
for character, which is what a session stores and renders back (`reply_format.format_call`).
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass

from launcher.reply_format import TOOL_CLOSE, TOOL_OPEN

_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')
_OPENERS = {"{": "}", "[": "]"}


def new_call_id() -> str:
    """An id like OpenAI's (`call_` and 24 characters)."""
    return "call_" + uuid.uuid4().hex[:24]


@dataclass
class CallDelta:
    """A piece of call `index`: its start (`id` and `name` set) or more of its arguments."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class ParsedCall:
    id: str
    name: str
    arguments: str = ""
    complete: bool = False


class _ArgumentsScanner:
    """Finds where one JSON value ends, one character at a time (strings and nesting)."""

    def __init__(self) -> None:
        self.stack: list[str] = []
        self.started = self.in_string = self.escaped = self.done = False
        self.scalar = False

    def step(self, char: str) -> bool:
        """Takes `char`; False when it is past the value's end (it belongs to what follows)."""
        if self.done:
            return False
        if not self.started:
            if char.isspace():
                return True
            self.started = True
            self.scalar = char not in _OPENERS
        if self.scalar and not self.in_string and (char.isspace() or char in ",}]"):
            self.done = True
            return False
        self._track(char)
        return True

    def _track(self, char: str) -> None:
        if self.in_string:
            if self.escaped:
                self.escaped = False
            elif char == "\\":
                self.escaped = True
            elif char == '"':
                self.in_string = False
                self.done = self.scalar
            return
        if char == '"':
            self.in_string = True
        elif char in _OPENERS:
            self.stack.append(_OPENERS[char])
        elif self.stack and char == self.stack[-1]:
            self.stack.pop()
            self.done = not self.stack


class ToolCallParser:
    """One reply's text and calls (see the module docstring)."""

    def __init__(self) -> None:
        self.calls: list[ParsedCall] = []
        self._state = "text"
        self._buf = ""
        self._args: _ArgumentsScanner | None = None

    @property
    def held(self) -> int:
        """Characters taken in but not yet told (a possible marker, an unfinished head)."""
        return len(self._buf)

    def feed(self, text: str) -> list[str | CallDelta]:
        self._buf += text
        out: list[str | CallDelta] = []
        while True:
            step = getattr(self, f"_{self._state}")(out)
            if not step:
                return out

    def close(self) -> list[str | CallDelta]:
        """The reply ended: held text is content, unless calls came before it (then it can
        only be the start of another call, cut off); an unfinished call stays as it is."""
        out: list[str | CallDelta] = []
        if self._state == "text" and self._buf and not self.calls:
            out.append(self._buf)
        self._buf = ""
        return out

    def _text(self, out: list[str | CallDelta]) -> bool:
        at = self._buf.find(TOOL_OPEN)
        if at < 0:
            keep = _partial_marker(self._buf)
            told, self._buf = self._buf[: len(self._buf) - keep], self._buf[len(self._buf) - keep :]
            if self.calls and told.strip() == "":
                told = ""  # the line break between calls
            if told:
                out.append(told)
            return False
        if at and not (self.calls and self._buf[:at].strip() == ""):
            out.append(self._buf[:at])
        self._buf, self._state = self._buf[at + len(TOOL_OPEN) :], "head"
        return True

    def _head(self, out: list[str | CallDelta]) -> bool:
        match = _HEAD.match(self._buf)
        if match is None:
            return False
        call = ParsedCall(new_call_id(), _unescape(match.group(1)))
        self.calls.append(call)
        out.append(CallDelta(len(self.calls) - 1, id=call.id, name=call.name))
        self._buf, self._state = self._buf[match.end() :], "arguments"
        self._args = _ArgumentsScanner()
        return True

    def _arguments(self, out: list[str | CallDelta]) -> bool:
        scanner, call = self._args, self.calls[-1]
        assert scanner is not None
        taken = 0
        for char in self._buf:
            if not scanner.step(char):
                break
            taken += 1
        piece, self._buf = self._buf[:taken], self._buf[taken:]
        if not call.arguments:
            piece = piece.lstrip()
        if piece:
            call.arguments += piece
            out.append(CallDelta(len(self.calls) - 1, arguments=piece))
        if not scanner.done:
            return False
        self._state = "tail"
        return True

    def _tail(self, out: list[str | CallDelta]) -> bool:
        at = self._buf.find(TOOL_CLOSE)
        if at < 0:
            return False
        self.calls[-1].complete = True
        self._buf, self._state = self._buf[at + len(TOOL_CLOSE) :], "text"
        return True


def _partial_marker(text: str) -> int:
    """How many characters at the end of `text` could begin `<tool_call>`."""
    for size in range(min(len(TOOL_OPEN) - 1, len(text)), 0, -1):
        if TOOL_OPEN.startswith(text[-size:]):
            return size
    return 0


def _unescape(name: str) -> str:
    return name.replace('\\"', '"').replace("\\\\", "\\")
