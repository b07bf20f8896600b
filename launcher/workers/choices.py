"""One choice of a reply as its client sees it: text cut at a stop string, tool calls read
out of it, and the log probabilities of the tokens told so far.

The engine streams `TokenEvent`s per choice; `ChoiceOutput.feed` turns each into a `Delta`:
the text (and the calls, when the request lets the model call tools: `tool_parser`) that can
be told now. Stop strings apply to the text only, never inside a call: a call a grammar
forced is always whole JSON. A token's log probability goes out with the first delta that
tells any of its text, so a stream's `logprobs` follow its text; tokens cut off by a stop
string are left out with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from launcher.workers.generation import StopScanner, TokenEvent, TokenLogprob
from launcher.workers.tool_parser import CallDelta, ParsedCall, ToolCallParser


@dataclass
class Delta:
    content: str = ""
    calls: list[CallDelta] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.calls or self.logprobs)


class ChoiceOutput:
    """The reply of choice `index` so far; `finish_reason` is set once it is over."""

    def __init__(self, index: int, stops: list[str], *, tools: bool = False) -> None:
        self.index = index
        self.scanner = StopScanner(stops)
        self.parser = ToolCallParser() if tools else None
        self.finish_reason: str | None = None
        self.text_parts: list[str] = []
        self.logprobs: list[TokenLogprob] = []
        self._queued: list[tuple[int, TokenLogprob]] = []  # (first character, entry)
        self._raw = 0  # characters of the reply taken in
        self._told = 0  # of which told (or known to be cut off)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def calls(self) -> list[ParsedCall]:
        return self.parser.calls if self.parser else []

    @property
    def stop_string(self) -> str | None:
        """The stop string that ended the reply (None: the end token, a length or a call)."""
        return self.scanner.matched

    @property
    def content(self) -> str:
        return "".join(self.text_parts)

    def feed(self, event: TokenEvent) -> Delta:
        """What `event` adds for the client (maybe nothing yet)."""
        delta = Delta()
        if self.done:
            return delta
        self._queued += [(self._raw, entry) for entry in event.logprobs]
        self._raw += len(event.text)
        items = self.parser.feed(event.text) if self.parser else [event.text]
        if self._take(items, delta):
            self.finish_reason = "stop"
            self._told += len(delta.content)
            self._release(delta)
            self._queued.clear()
        elif event.finish_reason is not None:
            self._take(self.parser.close() if self.parser else [], delta)
            delta.content += self.scanner.flush()
            self.finish_reason = event.finish_reason
            self._told = self._raw
            self._release(delta)
        else:
            self._told = self._raw - self.scanner.held - (self.parser.held if self.parser else 0)
            self._release(delta)
        self.text_parts.append(delta.content)
        return delta

    def _take(self, items: list[str | CallDelta], delta: Delta) -> bool:
        """Text through the stop scanner, calls as they are; True when a stop string ends it."""
        for item in items:
            if isinstance(item, str):
                out, matched = self.scanner.feed(item)
                delta.content += out
                if matched:
                    return True
            else:
                delta.content += self.scanner.flush()  # a call began: no stop string can end
                delta.calls.append(item)
        return False

    def _release(self, delta: Delta) -> None:
        while self._queued and self._queued[0][0] < self._told:
            entry = self._queued.pop(0)[1]
            delta.logprobs.append(entry)
            self.logprobs.append(entry)
