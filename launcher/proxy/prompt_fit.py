"""Whether a prompt fits the context, as the backend counts it, and which old turns to leave
out of a session's prompt when it does not.

The backend renders the chat template and tokenizes; so only the backend knows how long a
prompt is. The proxy asks it (`/llmup/prompt-tokens`, the same rendering and tokenizing the
worker generates from) and acts on that count alone: a request whose prompt and `max_tokens`
do not fit is refused before anything is generated, and a request without `max_tokens` is
sent without one (the worker gives the reply the rest of the context). The proxy never
invents a limit that the backend could then refuse.

A session's stored turns carry their content tokens (counted when they were new, the
reply's by the backend), so choosing which old turns to leave out starts from a guess that
costs nothing; each guess is then counted by the backend, and more turns are left out only
while that count says the prompt is still too long.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from launcher.errors import ApiError, ContextLengthError
from launcher.protocol import PROMPT_TOKENS_PATH, PromptTokens, context_length_message
from launcher.proxy.context import message_text
from launcher.proxy.store.base import Conversation, Message

log = logging.getLogger(__name__)

CACHE_SIZE = 256  # counted prompts kept (identical stateless requests are counted once)
TOKEN_CACHE_SIZE = 20_000


def _digest(value: Any, owner: str) -> bytes:
    """The cache key of `value` for one API key (`owner`): a count cached for one key never
    makes another key's request faster, so the cache cannot tell one key what another sent
    (a timing side channel)."""
    text = json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    digest = hashlib.blake2b(owner.encode("utf-8") + b"\0", digest_size=16)
    digest.update(text.encode("utf-8"))
    return digest.digest()


class PromptCounter:
    """The backend's count of a request's prompt, cached by the request's digest. None when
    the backend has no such route (a container image older than this proxy): the proxy
    then checks nothing itself and the backend refuses what does not fit."""

    def __init__(self, upstream: Any) -> None:
        self.upstream = upstream
        self._cache: OrderedDict[bytes, PromptTokens] = OrderedDict()
        self._missing = False

    async def count(self, request: dict[str, Any], *, owner: str) -> PromptTokens | None:
        if self._missing:
            return None
        key = _digest(request, owner)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        reply = await self.upstream.call_json(
            "POST", PROMPT_TOKENS_PATH, body=request, missing_ok=True
        )
        if reply is None:
            log.warning("the backend cannot count prompts (%s): not checked", PROMPT_TOKENS_PATH)
            self._missing = True
            return None
        counted = PromptTokens.model_validate(reply)
        self._cache[key] = counted
        if len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return counted


class TokenCounter:
    """Counts tokens of a text with the backend's tokenizer (`/extras/tokenize/count`),
    caching by content digest: an embeddings input's length."""

    def __init__(self, upstream: Any) -> None:
        self.upstream = upstream
        self._cache: OrderedDict[bytes, int] = OrderedDict()

    async def count(self, text: str, *, owner: str) -> int:
        key = _digest(text, owner)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        try:
            reply = await self.upstream.post_json("/extras/tokenize/count", {"input": text})
            value = int(reply["count"])
        except (ApiError, KeyError, TypeError, ValueError) as exc:
            if getattr(exc, "status", 0) == 503:
                raise
            log.warning("backend cannot count tokens (%s); estimating from length", exc)
            value = estimate_tokens(text)
        self._cache[key] = value
        if len(self._cache) > TOKEN_CACHE_SIZE:
            self._cache.popitem(last=False)
        return value


def estimate_tokens(text: str) -> int:
    """A token count without the tokenizer (about 3 bytes a token for Llama's vocabulary):
    only ever a first guess, never what a request is refused on."""
    return len(text.encode("utf-8")) // 3 + 1


def check_fits(counted: PromptTokens | None, reply: int, what: str) -> None:
    """400 `context_length_exceeded` (OpenAI's wording) unless the prompt as the backend
    counted it and `reply` tokens fit its context."""
    if counted is not None and counted.prompt_tokens + reply > counted.context:
        message = context_length_message(counted.context, counted.prompt_tokens, reply, what)
        raise ContextLengthError(message, param=what)


@dataclass(frozen=True)
class Fitted:
    messages: list[Message]
    dropped_turns: int
    new_tokens: int  # the new messages' content tokens (kept with the stored turn)
    prompt_tokens: int | None  # the prompt as the backend counted it (None: not counted)


@dataclass(frozen=True)
class FitRequest:
    """What one request asks of the context: `reserve` tokens kept for the reply when old
    turns can be left out for them (max_tokens, or the default reserve), at least `minimum`
    (max_tokens, or one token) in any case; `template` the request's fields besides its
    messages that the chat template reads (tools, response_format...)."""

    reserve: int
    minimum: int
    template: dict[str, Any]


class ContextFitter:
    """Chooses the history that fits: all of it, or (policy "drop") the newest turns.
    `allowance` is the first guess of a chat template's tokens per message."""

    def __init__(self, counter: PromptCounter, *, policy: str, allowance: int) -> None:
        self.counter = counter
        self.policy = policy
        self.allowance = allowance

    async def fit(
        self,
        history: Conversation,
        keep: int,
        new: list[Message],
        ask: FitRequest,
        *,
        hint: int,
        owner: str,
    ) -> Fitted:
        """The prompt to send (system, the newest of the first `keep` stored turns that fit,
        the new messages); ContextLengthError when even the new messages cannot fit. `hint`
        is the context as planned, for the first guess only; `owner` scopes the count cache."""
        head = [history.system] if history.system else []
        turns = history.turns[:keep]
        first = 0 if self.policy == "error" else self._guess(history, keep, head + new, ask, hint)
        while True:
            messages = head + [m for turn in turns[first:] for m in turn] + new
            counted = await self.counter.count({**ask.template, "messages": messages}, owner=owner)
            if counted is None:
                return Fitted(messages, first, _estimate(new), None)
            excess = counted.prompt_tokens + ask.reserve - counted.context
            if excess <= 0 or first == len(turns):
                break
            if self.policy == "error":
                raise ContextLengthError(
                    context_length_message(
                        counted.context, counted.prompt_tokens, ask.reserve, "messages"
                    )
                    + " The session is kept whole (LLMUP_CONTEXT_POLICY=error): delete it, "
                    "lower max_tokens, or use the drop policy",
                    param="messages",
                )
            first = _drop_for(turns, first, excess, counted, len(head))
        check_fits(counted, ask.minimum, "messages")
        new_tokens = sum((counted.message_tokens or [])[len(messages) - len(new) :])
        return Fitted(messages, first, new_tokens, counted.prompt_tokens)

    def _guess(
        self, history: Conversation, keep: int, fixed: list[Message], ask: FitRequest, hint: int
    ) -> int:
        """The oldest turn to keep by the stored counts (0: all of them)."""
        per = self.allowance
        budget = hint - ask.reserve - _estimate(fixed) - per * (len(fixed) + 1)
        costs = [turn_cost(history, i) + per * len(history.turns[i]) for i in range(keep)]
        first, total = 0, sum(costs)
        while first < keep and total > budget:
            total -= costs[first]
            first += 1
        return first


def _drop_for(
    turns: list[list[Message]], first: int, excess: int, counted: PromptTokens, head: int
) -> int:
    """The next oldest turn to keep: enough of the kept turns left out to cover `excess`
    tokens, weighed by the backend's counts of their messages plus the template's markers
    this count showed (at least one more turn)."""
    sizes = counted.message_tokens or []
    n_messages = max(len(sizes), 1)
    per = max(0, math.ceil((counted.prompt_tokens - sum(sizes)) / (n_messages + 1)))
    offset = head
    covered = 0
    while first < len(turns) and covered < excess:
        size = len(turns[first])
        covered += sum(sizes[offset : offset + size]) + per * size
        offset += size
        first += 1
    return first


def turn_cost(history: Conversation, index: int) -> int:
    """A stored turn's content tokens: as recorded, else estimated (turns stored before
    counts were kept)."""
    tokens = history.record(index).tokens
    return tokens if tokens is not None else _estimate(history.turns[index])


def _estimate(messages: list[Message]) -> int:
    return sum(estimate_tokens(message_text(m)) for m in messages)
