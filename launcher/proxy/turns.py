"""One chat turn in a session: take the session, line the request up with it, fit the
prompt, and commit the reply (or, for a retry, find the reply already stored).

The session's lock is held from loading to committing, so one session's turns never
interleave. A turn that would push the session past its message cap is refused, so is one
that would take its API key past the sessions or stored bytes one key may keep (429), and
one that could not be stored (the disk is full), all before anything is generated.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import anyio

from launcher.errors import BadRequestError, KeyLimitError
from launcher.proxy.context import TurnPlan, is_prefill, message_text, plan_turn
from launcher.proxy.prompt_fit import FitRequest, Fitted, estimate_tokens
from launcher.proxy.replies import Reply, assistant_message, completion_tokens
from launcher.proxy.state import ProxyState
from launcher.proxy.store import (
    Conversation,
    Message,
    NewTurn,
    ResponseRecord,
    TurnRecord,
    turn_bytes,
)

DROPPED_HEADER = "X-Llmup-Context-Dropped"
REWOUND_HEADER = "X-Llmup-Session-Rewound"
REPLAYED_HEADER = "X-Llmup-Session-Replayed"


@dataclass(frozen=True)
class SessionUse:
    """How a request uses a session. Chat names one and sends messages that `plan_turn`
    lines up with it; the Responses and Messages APIs say themselves what is new (`plan`),
    may start a session as a branch of another's history (`base`, a history without an
    epoch: the new session is written with its first turn) and keep a record of the turn
    (`respond`: the Responses API's stored response, made from the reply)."""

    session_id: str
    plan: Callable[[Conversation], TurnPlan] | None = None
    base: Conversation | None = None
    respond: Callable[[Reply], ResponseRecord] | None = None


@dataclass(frozen=True)
class SessionTurn:
    owner: str
    session_id: str
    history: Conversation
    plan: TurnPlan
    request: str  # digest of the client's request, kept to recognise a retry
    fitted: Fitted | None = None  # None for a retry: nothing is sent
    respond: Callable[[Reply], ResponseRecord] | None = None

    @property
    def retry(self) -> Reply | None:
        return self.plan.retry

    def headers(self) -> dict[str, str]:
        """What the response says about the session: turns left out of the prompt, turns
        replaced by the client's edited history, or a stored reply sent again."""
        if self.retry is not None:
            return {REPLAYED_HEADER: "1"}
        headers = {DROPPED_HEADER: str(self.fitted.dropped_turns if self.fitted else 0)}
        rewound = self.plan.rewound(self.history)
        if rewound:
            headers[REWOUND_HEADER] = str(rewound)
        return headers


RETRY_COUNT_HEADER = "x-stainless-retry-count"  # sent by the openai SDKs, 1 on a first retry
IDEMPOTENCY_HEADER = "idempotency-key"


def request_digest(body: Any, headers: Mapping[str, str]) -> str:
    """The client's request as sent (the session id aside) and its Idempotency-Key: the
    same digest for a retry."""
    fields = body.model_dump(mode="json", exclude_unset=True, exclude={"session_id"})
    fields[IDEMPOTENCY_HEADER] = headers.get(IDEMPOTENCY_HEADER)
    text = json.dumps(fields, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def says_retry(headers: Mapping[str, str]) -> bool:
    """Whether the client marks the request as a retry of an earlier one."""
    count = headers.get(RETRY_COUNT_HEADER, "0")
    return IDEMPOTENCY_HEADER in headers or (count.isdigit() and int(count) > 0)


async def prepare(
    st: ProxyState,
    stack: AsyncExitStack,
    body: Any,
    incoming: list[Message],
    ask: FitRequest,
    *,
    owner: str,
    use: SessionUse,
    headers: Mapping[str, str],
) -> SessionTurn:
    """The turn to run, with the session locked (for as long as `stack` stays open), its
    prompt fitted to the context for `ask`."""
    session_id = use.session_id
    await stack.enter_async_context(st.session_lock(owner, session_id))
    history = use.base
    if history is None:
        history = await anyio.to_thread.run_sync(st.sessions.load, owner, session_id)
    request = request_digest(body, headers)
    if use.plan is not None:
        plan = use.plan(history)
    else:
        plan = plan_turn(history, incoming, request, retrying=says_retry(headers))
    turn = SessionTurn(owner, session_id, history, plan, request, respond=use.respond)
    if plan.retry is not None:
        return turn
    await check_turn_limits(st, owner, history, plan)
    await anyio.to_thread.run_sync(st.sessions.check_space)
    base = replace(history, system=plan.system or history.system)
    fitted = await st.fitter.fit(base, plan.keep, plan.messages, ask, hint=st.context, owner=owner)
    st.metrics.count_drop(fitted.dropped_turns)
    return replace(turn, fitted=fitted)


async def check_turn_limits(
    st: ProxyState, owner: str, history: Conversation, plan: TurnPlan
) -> None:
    """What a session may hold and what one key may keep, before `plan` is stored: chat
    turns and items added to a conversation alike."""
    _check_size(st, history, plan)
    await _check_key_quota(st, owner, history, plan)


def _check_size(st: ProxyState, history: Conversation, plan: TurnPlan) -> None:
    cap = st.proxy.max_session_messages
    kept = sum(len(turn) for turn in history.turns[: plan.keep])
    total = kept + len(plan.messages) + 1  # and the reply
    if total > cap:
        raise BadRequestError(
            f"this turn would make the session {total} messages long, more than the {cap} "
            "a session may hold (LLMUP_PROXY__MAX_SESSION_MESSAGES); delete it "
            "(DELETE /v1/sessions/{id}) or start a new one",
            param="messages",
            code="session_too_long",
        )


async def _check_key_quota(
    st: ProxyState, owner: str, history: Conversation, plan: TurnPlan
) -> None:
    """429 when this turn would take its API key past the sessions or the stored bytes one
    key may keep (the reply, not yet known, may take it past by that much)."""
    usage = await anyio.to_thread.run_sync(st.sessions.usage, owner)
    most = st.proxy.max_sessions_per_key
    if history.epoch is None and usage.sessions >= most:
        raise KeyLimitError(
            f"this API key has {usage.sessions} sessions, the most one key may keep "
            "(LLMUP_PROXY__MAX_SESSIONS_PER_KEY); delete one (DELETE /v1/sessions/{id}) "
            "or let idle ones expire",
            code="sessions_per_key_exceeded",
        )
    replaced = range(plan.keep, len(history.turns))
    freed = sum(turn_bytes(history.turns[i], history.record(i).reply) for i in replaced)
    adding = turn_bytes(plan.messages + ([plan.system] if plan.system else []), None)
    limit = st.proxy.max_stored_bytes_per_key
    if usage.bytes - freed + adding > limit:
        raise KeyLimitError(
            f"this API key's stored conversations hold {usage.bytes} bytes and this turn "
            f"would take them past the {limit} one key may keep "
            "(LLMUP_PROXY__MAX_STORED_BYTES_PER_KEY); delete sessions it no longer needs",
            code="storage_per_key_exceeded",
        )


def continued(messages: list[Message], reply: Message) -> list[Message]:
    """The turn's messages with the reply: a reply that continued the request's last
    (assistant) message is stored as one message, its beginning and the continuation."""
    if messages and is_prefill(messages[-1]):
        head = messages[-1]
        merged = {**reply, "content": (head.get("content") or "") + (reply.get("content") or "")}
        return [*messages[:-1], merged]
    return [*messages, reply]


async def commit(st: ProxyState, turn: SessionTurn, reply: Reply) -> bool:
    """Store the turn with its reply; False when the session was deleted meanwhile."""
    message = assistant_message(reply)
    reply_tokens = completion_tokens(reply)
    if reply_tokens is None:
        reply_tokens = estimate_tokens(message_text(message))
    record = TurnRecord(
        tokens=turn.fitted.new_tokens + reply_tokens, request=turn.request, reply=reply
    )
    new = NewTurn(
        base=turn.history,
        keep=turn.plan.keep,
        messages=continued(turn.plan.messages, message),
        system=turn.plan.system,
        record=record,
        response=turn.respond(reply) if turn.respond else None,
    )
    store = partial(st.sessions.commit, turn.owner, turn.session_id, new)
    return await anyio.to_thread.run_sync(store)
