"""A session's next prompt: stored history plus the new messages, cut to fit the context.

Clients may send only the new message or resend the whole conversation; when the request's
messages start with the stored history, only the rest is new, so nothing is stored twice.
Tokens are counted with the backend's own tokenizer (`/extras/tokenize/count`) per message,
plus a per-message allowance for the chat template's markers (see `OverheadMeter`).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from launcher.errors import BadRequestError, ContextLengthError, ProxyError
from launcher.proxy.sessions import Conversation, Message

log = logging.getLogger(__name__)

MAX_OVERHEAD = 64
CACHE_SIZE = 20_000
# Tokens kept free at the end of the context. llama-cpp-python does not check max_tokens
# while it holds back an incomplete UTF-8 character (up to 3 more byte tokens), so a reply
# allowed to reach the last context position can run past it and fail with "llama_decode
# returned 1" (a 500). Measured with the tiny test model: prompt + max_tokens = n_ctx failed
# 4 of 96 requests, n_ctx - 1 none.
UTF8_HOLDBACK_TOKENS = 3
# OpenAI's (and llama_cpp.server's) max_tokens for legacy completions when none is given.
COMPLETION_DEFAULT_MAX_TOKENS = 16


def normalize(message: Any) -> Message:
    """The stored form of a message: role, text content, and `name` / `tool_call_id` when
    given. A `developer` message (OpenAI's newer name for instructions) becomes a system
    one: Llama-2 templates know only system, user and assistant."""
    role = "system" if message.role == "developer" else message.role
    normal: Message = {"role": role, "content": message.text()}
    if message.name is not None:
        normal["name"] = message.name
    if getattr(message, "tool_call_id", None) is not None:
        normal["tool_call_id"] = message.tool_call_id
    return normal


@dataclass(frozen=True)
class NewTurn:
    """What one request adds: maybe a (new) system message, and the new messages."""

    system: Message | None
    messages: list[Message]


def split_new(history: Conversation, incoming: list[Message]) -> NewTurn:
    """Separate a request's messages into what the session already has and what is new."""
    system = incoming[0] if incoming and incoming[0]["role"] == "system" else None
    rest = incoming[1:] if system else list(incoming)
    stored = history.body()
    if stored and len(rest) > len(stored) and rest[: len(stored)] == stored:
        rest = rest[len(stored) :]
    elif stored and rest == stored:
        rest = []
    if not rest:
        raise BadRequestError(
            "the request adds no new message to the session: send the next user message",
            param="messages",
        )
    if system == history.system:
        system = None  # unchanged
    return NewTurn(system=system, messages=rest)


class OverheadMeter:
    """Tokens a chat template adds per message, learned from the backend's replies.

    Starts at the configured figure; each non-streamed reply's `usage.prompt_tokens`, minus
    the counted contents, spread over its messages and the reply's header, can only raise it
    (capped), so a template with heavier markers than assumed stops overflowing after one
    reply.
    """

    def __init__(self, initial: int) -> None:
        self.per_message = initial

    def observe(self, prompt_tokens: int, content_tokens: int, n_messages: int) -> None:
        if n_messages <= 0 or prompt_tokens <= content_tokens:
            return
        seen = math.ceil((prompt_tokens - content_tokens) / n_messages)
        if self.per_message < seen <= MAX_OVERHEAD:
            log.info("chat template overhead raised to %d tokens per message", seen)
            self.per_message = seen


class TokenCounter:
    """Counts tokens of texts with the backend's tokenizer, caching by content digest."""

    def __init__(self, upstream: Any) -> None:
        self.upstream = upstream
        self._cache: OrderedDict[bytes, int] = OrderedDict()
        self._warned = False

    async def count(self, text: str) -> int:
        key = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        value = await self._ask(text)
        self._cache[key] = value
        if len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return value

    async def _ask(self, text: str) -> int:
        try:
            reply = await self.upstream.post_json("/extras/tokenize/count", {"input": text})
            return int(reply["count"])
        except (ProxyError, KeyError, TypeError, ValueError) as exc:
            if getattr(exc, "status", 0) == 503:
                raise
            if not self._warned:
                log.warning("backend cannot count tokens (%s); estimating from length", exc)
                self._warned = True
            return len(text.encode("utf-8")) // 3 + 1


@dataclass(frozen=True)
class Fitted:
    messages: list[Message]
    dropped_turns: int
    content_tokens: int  # the messages' contents, counted with the tokenizer
    prompt_tokens: int  # the whole prompt as estimated: contents + template overhead


class ContextFitter:
    """Chooses the history that fits: all of it, or (policy "drop") the newest turns."""

    def __init__(self, counter: TokenCounter, overhead: OverheadMeter, policy: str) -> None:
        self.counter = counter
        self.overhead = overhead
        self.policy = policy

    async def cost(self, messages: list[Message]) -> int:
        total = 0
        for message in messages:
            total += await self.counter.count(message["content"]) + self.overhead.per_message
        return total

    async def fit(
        self, system: Message | None, turns: list[list[Message]], new: list[Message], *, budget: int
    ) -> Fitted:
        """The prompt to send; ContextLengthError when even the new turn cannot fit."""
        head = [system] if system else []
        # the template's header for the reply costs about one message's markers too
        fixed = await self.cost(head + new) + self.overhead.per_message
        if fixed > budget:
            raise ContextLengthError(
                f"the system and new messages need about {fixed} tokens, more than the "
                f"{budget} the context window leaves after max_tokens",
                param="messages",
            )
        costs = [await self.cost(turn) for turn in turns]
        keep = len(turns)
        while keep and fixed + sum(costs[len(turns) - keep :]) > budget:
            if self.policy == "error":
                raise ContextLengthError(
                    f"the session needs about {fixed + sum(costs)} tokens, more than the "
                    f"{budget} the context window leaves after max_tokens; delete the session, "
                    "lower max_tokens, or use the drop policy (LLMUP_CONTEXT_POLICY=drop)",
                    param="messages",
                )
            keep -= 1
        kept = [m for turn in turns[len(turns) - keep :] for m in turn]
        messages = head + kept + new
        prompt = fixed + sum(costs[len(turns) - keep :])
        content = prompt - self.overhead.per_message * (len(messages) + 1)
        return Fitted(
            messages=messages,
            dropped_turns=len(turns) - keep,
            content_tokens=content,
            prompt_tokens=prompt,
        )


def usable_context(context: int) -> int:
    """Prompt + reply tokens a request may use: the context less the UTF-8 hold-back."""
    return context - UTF8_HOLDBACK_TOKENS


def reply_budget(context: int, max_tokens: int | None, default_reserve: int) -> int:
    """Prompt tokens available once the reply's share is set aside."""
    usable = usable_context(context)
    reserve = max_tokens if max_tokens is not None else min(default_reserve, usable // 4)
    if reserve >= usable:
        raise ContextLengthError(
            f"max_tokens {reserve} does not fit the model's {context}-token context window "
            f"({UTF8_HOLDBACK_TOKENS} of its tokens are kept free)",
            param="max_tokens",
        )
    return usable - reserve


def reply_limit(context: int, max_tokens: int | None, prompt_tokens: int) -> int:
    """The max_tokens sent to the backend: the client's, else the rest of the usable context
    (OpenAI's "until the context is full"), never left to the backend's own default."""
    if max_tokens is not None:
        return max_tokens
    return max(1, usable_context(context) - prompt_tokens)
