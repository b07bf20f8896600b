"""A session's next prompt: stored history plus the new messages, cut to fit the context.

Clients may send only the new messages or resend the whole conversation. `plan_turn` lines
the request up with the stored history by longest common prefix (assistant messages
compared with their whitespace normalised, as many UIs trim replies): what matches is not
stored again, and from the first real difference the client's version is the truth (the
session is rewound to the start of that turn, as "edit and resend" does in chat UIs). A
retry of the request that made the last stored turn gets the stored reply again.

Tokens are counted with the backend's own tokenizer (`/extras/tokenize/count`): once per
request for the new messages together (and the system message, cached), never once per
message; a stored turn keeps its count (the reply's is the backend's exact figure), so
history is not counted again. A per-message allowance covers the chat template's markers
(see `OverheadMeter`).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from launcher.errors import BadRequestError, ContextLengthError, ProxyError
from launcher.proxy.store.base import Conversation, Message

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
    """The stored form of a message: role, text content, and `name`, `tool_calls`,
    `function_call`, `tool_call_id` when given. A `developer` message (OpenAI's newer name
    for instructions) becomes a system one: Llama-2 templates know only system, user and
    assistant."""
    role = "system" if message.role == "developer" else message.role
    content = getattr(message, "content", None)
    text = None if content is None and role == "assistant" else message.text()
    normal: Message = {"role": role, "content": text}
    for name in ("name", "tool_call_id"):
        if getattr(message, name, None) is not None:
            normal[name] = getattr(message, name)
    for name in ("tool_calls", "function_call"):
        value = getattr(message, name, None)
        if value is not None:
            normal[name] = _plain(value)
    return normal


def _plain(value: Any) -> Any:
    if isinstance(value, list):
        return [item.model_dump(mode="json", exclude_none=True) for item in value]
    return value.model_dump(mode="json", exclude_none=True)


def message_text(message: Message) -> str:
    """What of a message the tokenizer sees: its content, and its calls' names and arguments."""
    calls = list(message.get("tool_calls") or [])
    if message.get("function_call"):
        calls.append({"function": message["function_call"]})
    parts = [message.get("content") or ""]
    for call in calls:
        function = call.get("function") or {}
        parts += [str(function.get("name", "")), str(function.get("arguments", ""))]
    return "\n".join(p for p in parts if p)


def _comparable(message: Message) -> tuple:
    """What must match for a resent message to be the stored one."""
    if message.get("role") != "assistant":
        return tuple(sorted((k, repr(v)) for k, v in message.items()))
    calls = [
        (c.get("function", {}).get("name"), _squash(str(c.get("function", {}).get("arguments"))))
        for c in message.get("tool_calls") or []
    ]
    return ("assistant", _squash(message.get("content") or ""), tuple(calls))


def _squash(text: str) -> str:
    return " ".join(text.split())


def common_prefix(stored: list[Message], sent: list[Message]) -> int:
    """How many leading messages of `sent` are the stored ones."""
    count = 0
    for old, new in zip(stored, sent):
        if _comparable(old) != _comparable(new):
            break
        count += 1
    return count


@dataclass(frozen=True)
class TurnPlan:
    """What one request does to a session: set a new system message or not, keep the first
    `keep` stored turns (fewer than stored: a rewind), add `messages`; or, for a retry of
    the last turn, answer `retry` (the stored reply) and change nothing."""

    system: Message | None
    messages: list[Message]
    keep: int
    retry: dict[str, Any] | None = None

    def rewound(self, history: Conversation) -> int:
        return len(history.turns) - self.keep


def plan_turn(
    history: Conversation, incoming: list[Message], request: str, *, retrying: bool = False
) -> TurnPlan:
    """Line a request's messages up with the session's history (see the module's doc).

    A request identical to the one that made the last turn is a retry when it resends the
    history (its messages then are exactly that turn's) or says it is one (`retrying`: the
    openai SDKs' retry header, or an Idempotency-Key); otherwise one new message sent again
    ("hello", twice) is a new turn."""
    turns = history.turns
    system = incoming[0] if incoming and incoming[0]["role"] == "system" else None
    rest = incoming[1:] if system else list(incoming)
    stored = history.body()
    resends = bool(stored) and _resends_history(stored, rest)
    last = history.record(len(turns) - 1) if turns else None
    if last and last.request == request and last.reply is not None and (retrying or resends):
        return TurnPlan(system=None, messages=[], keep=len(turns), retry=last.reply)
    keep, new = len(turns), rest
    if resends:
        matched = common_prefix(stored, rest)
        keep = _turn_of(turns, matched)
        new = rest[sum(len(t) for t in turns[:keep]) :]
    if not new:
        raise BadRequestError(
            "the request adds no new message to the session: send the next user message",
            param="messages",
        )
    if system == history.system:
        system = None  # unchanged
    return TurnPlan(system=system, messages=new, keep=keep)


def _resends_history(stored: list[Message], rest: list[Message]) -> bool:
    """Whether a request carries the conversation so far rather than only new messages:
    it has an assistant message, or several messages of which the first is the session's
    first. (One message is always new, even if it repeats the first: "hello" twice.)"""
    if any(m["role"] == "assistant" for m in rest):
        return True
    return len(rest) > 1 and _comparable(rest[0]) == _comparable(stored[0])


def _turn_of(turns: list[list[Message]], matched: int) -> int:
    """The turns that `matched` leading messages cover completely (all: no rewind)."""
    covered = 0
    for index, turn in enumerate(turns):
        covered += len(turn)
        if covered > matched:
            return index
    return len(turns)


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
            return estimate_tokens(text)


def estimate_tokens(text: str) -> int:
    """A token count without the tokenizer (about 3 bytes a token for Llama's vocabulary)."""
    return len(text.encode("utf-8")) // 3 + 1


@dataclass(frozen=True)
class Fitted:
    messages: list[Message]
    dropped_turns: int
    new_tokens: int  # the new messages' contents, counted with the tokenizer
    content_tokens: int  # every sent message's contents
    prompt_tokens: int  # the whole prompt as estimated: contents + template overhead


class ContextFitter:
    """Chooses the history that fits: all of it, or (policy "drop") the newest turns."""

    def __init__(self, counter: TokenCounter, overhead: OverheadMeter, policy: str) -> None:
        self.counter = counter
        self.overhead = overhead
        self.policy = policy

    async def content_tokens(self, messages: list[Message]) -> int:
        """The messages' contents in one tokenizer call (joined), not one call each."""
        if not messages:
            return 0
        return await self.counter.count("\n".join(message_text(m) for m in messages))

    def turn_cost(self, history: Conversation, index: int) -> int:
        """A stored turn's content tokens: as recorded, else estimated (turns stored before
        counts were kept)."""
        tokens = history.record(index).tokens
        if tokens is None:
            tokens = sum(estimate_tokens(message_text(m)) for m in history.turns[index])
        return tokens

    async def fit(
        self, history: Conversation, keep: int, new: list[Message], *, budget: int
    ) -> Fitted:
        """The prompt to send (system, the newest of the first `keep` stored turns that fit,
        the new messages); ContextLengthError when even the new messages cannot fit."""
        head = [history.system] if history.system else []
        per = self.overhead.per_message
        new_tokens = await self.content_tokens(new)
        system_tokens = await self.content_tokens(head)
        # the template's header for the reply costs about one message's markers too
        fixed = system_tokens + new_tokens + per * (len(head) + len(new) + 1)
        if fixed > budget:
            raise ContextLengthError(
                f"the system and new messages need about {fixed} tokens, more than the "
                f"{budget} the context window leaves after max_tokens",
                param="messages",
            )
        turns = history.turns[:keep]
        costs = [self.turn_cost(history, i) + per * len(t) for i, t in enumerate(turns)]
        first = self._first_kept(costs, fixed, budget)
        messages = head + [m for turn in turns[first:] for m in turn] + new
        prompt = fixed + sum(costs[first:])
        return Fitted(
            messages=messages,
            dropped_turns=first,
            new_tokens=new_tokens,
            content_tokens=prompt - per * (len(messages) + 1),
            prompt_tokens=prompt,
        )

    def _first_kept(self, costs: list[int], fixed: int, budget: int) -> int:
        """The oldest turn that stays in the prompt (0: all of them)."""
        first, total = 0, fixed + sum(costs)
        while first < len(costs) and total > budget:
            if self.policy == "error":
                raise ContextLengthError(
                    f"the session needs about {fixed + sum(costs)} tokens, more than the "
                    f"{budget} the context window leaves after max_tokens; delete the session, "
                    "lower max_tokens, or use the drop policy (LLMUP_CONTEXT_POLICY=drop)",
                    param="messages",
                )
            total -= costs[first]
            first += 1
        return first


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
