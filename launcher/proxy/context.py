"""A session's next turn: what of a request is new, lined up with the stored history.

Clients may send only the new messages or resend the whole conversation. `plan_turn` lines
the request up with the stored history by longest common prefix (assistant messages
compared with their whitespace normalised, as many UIs trim replies): what matches is not
stored again, and from the first real difference the client's version is the truth (the
session is rewound to the start of that turn, as "edit and resend" does in chat UIs). A
retry of the request that made the last stored turn gets the stored reply again. Fitting
the prompt to the context is `prompt_fit`'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from launcher.errors import BadRequestError
from launcher.proxy.store.base import Conversation, Message


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
    it has an assistant message (other than a last one to continue: prefill), or several
    messages of which the first is the session's first. (One message is always new, even
    if it repeats the first: "hello" twice.)"""
    if rest and is_prefill(rest[-1]) and common_prefix(stored, rest) < len(rest):
        rest = rest[:-1]  # not the stored reply: one to continue
    if any(m["role"] == "assistant" for m in rest):
        return True
    return len(rest) > 1 and _comparable(rest[0]) == _comparable(stored[0])


def is_prefill(message: Message) -> bool:
    """An assistant message without calls, last in a request: a reply to continue."""
    calls = message.get("tool_calls") or message.get("function_call")
    return message.get("role") == "assistant" and not calls


def _turn_of(turns: list[list[Message]], matched: int) -> int:
    """The turns that `matched` leading messages cover completely (all: no rewind)."""
    covered = 0
    for index, turn in enumerate(turns):
        covered += len(turn)
        if covered > matched:
            return index
    return len(turns)
