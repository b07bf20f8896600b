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


@dataclass(frozen=True)
class GenerationParams:
    """One request's sampling. `top_k` 0 and `min_p` 0 turn those filters off; `grammar` is
    a llama.cpp GBNF grammar (JSON mode becomes one); `logit_bias` maps token id to bias."""

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


END = object()  # an engine emits this after a job's last event


@dataclass
class GenerationJob:
    """`cached_tokens` is set by an engine that keeps KV between requests: how many prompt
    tokens it did not have to evaluate (set before the job's first event)."""

    prompt: list[int]
    params: GenerationParams
    cancel: threading.Event
    emit: Callable[[object], None]
    session: SessionKey | None = None
    cached_tokens: int = 0


class StopScanner:
    """Cuts streamed text at the first stop string, holding back what may start one.

    Text is released only once it can no longer be the beginning of a stop string, so a stop
    string split across tokens is never partly sent to the client.
    """

    def __init__(self, stops: list[str]) -> None:
        self._stops = [s for s in stops if s]
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to send, whether a stop string was reached)."""
        self._held += text
        hits = [i for i in (self._held.find(s) for s in self._stops) if i >= 0]
        if hits:
            out, self._held = self._held[: min(hits)], ""
            return out, True
        keep = max((self._partial(s) for s in self._stops), default=0)
        cut = len(self._held) - keep
        out, self._held = self._held[:cut], self._held[cut:]
        return out, False

    def flush(self) -> str:
        out, self._held = self._held, ""
        return out

    def _partial(self, stop: str) -> int:
        """Length of the longest held suffix that is a proper prefix of `stop`."""
        for n in range(min(len(stop) - 1, len(self._held)), 0, -1):
            if self._held.endswith(stop[:n]):
                return n
        return 0


def first_line(exc: BaseException) -> str:
    """`Type: first line of the message`, for one-line logs and client-facing errors."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
