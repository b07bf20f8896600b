"""What llmup's own workers share below their HTTP layer: a request's sampling settings, the
token events a generation streams, the job handed to an engine thread, and stop strings.

Both workers (exllamav2 for GPTQ, llama.cpp's low-level API for GGUF) take a `GenerationJob`
on their engine thread and answer through its `emit` callback: `TokenEvent`s, then `END`, or
an exception. Nothing here imports an engine.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from launcher.reply_format import GrammarSpec


@dataclass(frozen=True)
class GenerationParams:
    """One request's sampling. `top_k` 0 and `min_p` 0 turn those filters off; `grammar` is
    a llama.cpp GBNF grammar (JSON mode and tool calls become one), inactive until one of
    `grammar_triggers` (regexes over the reply so far) matches when any are given;
    `logit_bias` maps token id to bias. `n` replies are generated from one prompt (choice i
    seeded with seed + i); `logprobs` asks for each token's log probability and that many
    alternatives (None: none); the end of a reply is held off for `min_tokens` tokens;
    `mirostat` (1 or 2, with `mirostat_tau` and `mirostat_eta`) replaces top-k/top-p/min-p.
    `reply` is what the reply must follow for an engine that constrains it from the JSON
    schemas themselves (exllamav2's filters), where llama.cpp gets `grammar`."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    top_k: int = 0
    min_p: float = 0.0
    repeat_penalty: float = 1.0  # llama.cpp's: 1 is off
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    grammar: str | None = None
    grammar_triggers: tuple[str, ...] = ()
    n: int = 1
    logprobs: int | None = None
    min_tokens: int = 0
    mirostat: int = 0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    reply: GrammarSpec | None = None


@dataclass(frozen=True)
class TopLogprob:
    """One candidate token at a position: its text, its bytes, its log probability."""

    token: str
    bytes: tuple[int, ...]
    logprob: float


@dataclass(frozen=True)
class TokenLogprob(TopLogprob):
    """The sampled token's log probability under the model, and the most likely tokens."""

    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class SessionKey:
    """Whose conversation a request continues: the owner is a hash of the caller's API key,
    so two keys that pick the same session id never meet."""

    owner: str
    session: str


@dataclass(frozen=True)
class TokenEvent:
    """A piece of streamed text; `tokens` is how many generated tokens it accounts for.

    The last event of a generation has `finish_reason` "stop" (end of sequence) or "length".
    The end-of-sequence token itself is not counted, as llama.cpp does not count it.
    """

    text: str
    tokens: int = 0
    finish_reason: str | None = None
    choice: int = 0
    logprobs: tuple[TokenLogprob, ...] = ()  # of the tokens it accounts for, when asked


END = object()  # an engine emits this after a job's last event (of every choice)


@dataclass
class GenerationJob:
    """`cached_tokens` is set by an engine that keeps KV between requests: how many prompt
    tokens it did not have to evaluate (set before the job's first event). `stopped` holds
    the choices the HTTP layer has ended (a stop string): the engine drops them at its next
    step, the others go on; `cancel` ends them all."""

    prompt: list[int]
    params: GenerationParams
    cancel: threading.Event
    emit: Callable[[object], None]
    session: SessionKey | None = None
    cached_tokens: int = 0
    stopped: set[int] = field(default_factory=set)
    owner: str | None = None  # who asks, for a stateless request's cached prompt

    def ended(self, choice: int) -> bool:
        return self.cancel.is_set() or choice in self.stopped


class StopScanner:
    """Cuts streamed text at the first stop string to complete, holding back what may start
    one.

    Text is released only once it can no longer be the beginning of a stop string, so a stop
    string split across tokens is never partly sent to the client. All stop strings are
    matched together in one pass over each new character (an Aho-Corasick automaton, built
    once per request), so the cost per token does not grow with the number of stops or their
    length; the held text is exactly the automaton's current depth. When several stops end at
    the same character the longest wins (it starts earliest).
    """

    def __init__(self, stops: list[str]) -> None:
        self._automaton = _StopAutomaton([s for s in stops if s])
        self._state = 0
        self._held = ""
        self.matched: str | None = None  # the stop string reached, once one is

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to send, whether a stop string was reached)."""
        automaton, state, start = self._automaton, self._state, len(self._held)
        self._held += text
        for offset, char in enumerate(text):
            state = automaton.step(state, char)
            if matched := automaton.matched[state]:
                end = start + offset + 1
                self.matched = self._held[end - matched : end]
                out, self._held, self._state = self._held[: end - matched], "", 0
                return out, True
        self._state = state
        cut = len(self._held) - automaton.depth[state]
        out, self._held = self._held[:cut], self._held[cut:]
        return out, False

    def flush(self) -> str:
        out, self._held, self._state = self._held, "", 0
        return out

    @property
    def held(self) -> int:
        """Characters taken in and not yet released (they may begin a stop string)."""
        return len(self._held)


class _StopAutomaton:
    """A trie of the stop strings with failure links: `step` follows one character;
    `depth[s]` is the length of the longest text suffix that begins a stop, `matched[s]`
    the length of the longest stop that ends here (0: none)."""

    def __init__(self, stops: list[str]) -> None:
        self.goto: list[dict[str, int]] = [{}]
        self.depth, self.matched, self.fail = [0], [0], [0]
        for stop in stops:
            self._insert(stop)
        self._link()

    def _insert(self, stop: str) -> None:
        state = 0
        for char in stop:
            if char not in self.goto[state]:
                self.goto.append({})
                self.depth.append(self.depth[state] + 1)
                self.matched.append(0)
                self.fail.append(0)
                self.goto[state][char] = len(self.goto) - 1
            state = self.goto[state][char]
        self.matched[state] = len(stop)

    def _link(self) -> None:
        """Failure links breadth first; a state inherits the match of its failure state."""
        queue = list(self.goto[0].values())
        for state in queue:  # the list grows while it is walked: breadth first
            for char, child in self.goto[state].items():
                queue.append(child)
                if state:
                    self.fail[child] = self.step(self.fail[state], char)
                self.matched[child] = self.matched[child] or self.matched[self.fail[child]]

    def step(self, state: int, char: str) -> int:
        while state and char not in self.goto[state]:
            state = self.fail[state]
        return self.goto[state].get(char, 0)


def first_line(exc: BaseException) -> str:
    """`Type: first line of the message`, for one-line logs and client-facing errors."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
