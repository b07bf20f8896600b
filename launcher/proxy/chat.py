"""The generation routes' work: admit, (for a session) lock, load, fit, forward, commit.

Order matters. The queue place is taken first (429 when there is none), then the session's
lock (one request per session at a time), then the history is fitted to the context, and
only then a place at the backend. Everything that can refuse a request does so before a
stream starts, so a client gets a plain JSON error instead of a broken stream.
"""

from __future__ import annotations

import time
from contextlib import AsyncExitStack
from dataclasses import dataclass
from functools import partial
from typing import Any

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from launcher.errors import BadRequestError, ContextLengthError, NotFoundError
from launcher.proxy import backend as backend_info
from launcher.proxy.context import (
    COMPLETION_DEFAULT_MAX_TOKENS,
    UTF8_HOLDBACK_TOKENS,
    Fitted,
    NewTurn,
    normalize,
    reply_budget,
    reply_limit,
    split_new,
    usable_context,
)
from launcher.proxy.models import (
    SESSION_ID,
    ChatRequest,
    EmbeddingRequest,
    TextCompletionRequest,
)
from launcher.proxy.relay import OwnedStream, StreamRelay, StreamResult
from launcher.proxy.sessions import Message
from launcher.proxy.state import ProxyState, proxy_state

SESSION_HEADER = "X-Session-Id"
DROPPED_HEADER = "X-Llmup-Context-Dropped"


@dataclass(frozen=True)
class SessionTurn:
    owner: str
    session_id: str
    new: NewTurn
    fitted: Fitted


def session_id_for(request: Request, body: ChatRequest) -> str | None:
    """The session named by header or body (they must agree), validated."""
    header = request.headers.get(SESSION_HEADER)
    if header and body.session_id and header != body.session_id:
        raise BadRequestError(
            "X-Session-Id and the body's session_id name different sessions", param="session_id"
        )
    session_id = header or body.session_id
    if session_id is not None and not SESSION_ID.match(session_id):
        raise BadRequestError(
            "a session id is 1-128 characters: letters, digits and . _ : @ - "
            "(starting with a letter or digit)",
            param="session_id",
        )
    return session_id


def backend_headers(owner: str, session_id: str | None) -> dict[str, str]:
    """X-Session-Id for slot-aware workers, scoped by owner so two keys never share one."""
    if session_id is None:
        return {}
    return {SESSION_HEADER: f"{owner[:16]}.{session_id}" if owner else session_id}


def upstream_body(body: Any, messages: list[Message] | None = None) -> dict[str, Any]:
    """The request as the backend gets it: unknown fields kept, `session_id` removed, and
    usage asked for in streams (the proxy drops it again unless the client asked too)."""
    payload = _without_nulls(
        body.model_dump(mode="json", exclude_unset=True, exclude={"session_id"})
    )
    if messages is not None:
        payload["messages"] = messages
    if payload.get("stream"):
        payload["stream_options"] = {**(payload.get("stream_options") or {}), "include_usage": True}
    return payload


def _without_nulls(payload: dict[str, Any]) -> dict[str, Any]:
    """OpenAI reads an explicit null as "the default"; some backends (llama_cpp.server)
    reject it, so nulls are left out, also inside messages."""
    clean = {k: v for k, v in payload.items() if v is not None}
    if isinstance(clean.get("messages"), list):
        clean["messages"] = [
            {k: v for k, v in m.items() if v is not None} if isinstance(m, dict) else m
            for m in clean["messages"]
        ]
    return clean


def _forwarded(originals: list[dict[str, Any]], normal: list[Message]) -> list[dict[str, Any]]:
    """A stateless request's messages as sent: the client's own (unknown fields kept), with
    the role and plain-text content the proxy validated (llama_cpp.server takes content
    parts only in user messages)."""
    return [
        {**orig, "role": norm["role"], "content": norm["content"]}
        for orig, norm in zip(originals, normal)
    ]


async def _prepare_session(
    st: ProxyState,
    stack: AsyncExitStack,
    body: ChatRequest,
    incoming: list[Message],
    owner: str,
    session_id: str,
) -> SessionTurn:
    await stack.enter_async_context(st.session_lock(owner, session_id))
    history = await anyio.to_thread.run_sync(st.sessions.load, owner, session_id)
    new = split_new(history, incoming)
    budget = reply_budget(st.context, body.requested_max_tokens(), st.proxy.default_reserve_tokens)
    system = new.system or history.system
    fitted = await st.fitter.fit(system, history.turns, new.messages, budget=budget)
    st.metrics.count_drop(fitted.dropped_turns)
    return SessionTurn(owner=owner, session_id=session_id, new=new, fitted=fitted)


async def _check_fit(st: ProxyState, messages: list[Message], max_tokens: int | None) -> Fitted:
    """A stateless request that cannot fit is refused here (400), not by a backend that may
    fail on it with a 500; without max_tokens only one reply token is set aside."""
    budget = reply_budget(st.context, max_tokens or 1, st.proxy.default_reserve_tokens)
    return await st.fitter.fit(None, [], messages, budget=budget)


async def _commit(st: ProxyState, turn: SessionTurn, reply_text: str) -> None:
    messages = [*turn.new.messages, {"role": "assistant", "content": reply_text}]
    commit = partial(
        st.sessions.commit_turn, turn.owner, turn.session_id, messages, system=turn.new.system
    )
    await anyio.to_thread.run_sync(commit)


def _reply_text(reply: dict[str, Any], kind: str) -> str:
    try:
        choice = reply["choices"][0]
        text = choice["message"].get("content") if kind == "chat" else choice.get("text")
    except (KeyError, IndexError, TypeError, AttributeError):
        return ""
    return text if isinstance(text, str) else ""


def _account(st: ProxyState, reply: dict[str, Any], turn: SessionTurn | None) -> None:
    usage = reply.get("usage") if isinstance(reply.get("usage"), dict) else {}
    st.metrics.count_tokens(usage.get("prompt_tokens"), usage.get("completion_tokens"))
    prompt = usage.get("prompt_tokens")
    if turn is not None and isinstance(prompt, int):
        fitted = turn.fitted
        st.overhead.observe(prompt, fitted.content_tokens, len(fitted.messages) + 1)


async def _prompt_estimate(st: ProxyState, body: Any, turn: SessionTurn | None) -> int | None:
    """Prompt tokens for a synthesized usage chunk, counted only when the client wants one."""
    if not body.wants_usage_chunk():
        return None
    if turn is not None:
        return await st.fitter.cost(turn.fitted.messages)
    if isinstance(body, ChatRequest):
        return await st.fitter.cost([normalize(m) for m in body.messages])
    prompt = body.prompt
    return await st.fitter.counter.count(prompt) if isinstance(prompt, str) else None


async def _stream(
    st: ProxyState,
    stack: AsyncExitStack,
    route: str,
    payload: dict[str, Any],
    *,
    body: Any,
    kind: str,
    headers: dict[str, str],
    turn: SessionTurn | None,
    started: float,
) -> Response:
    estimate = await _prompt_estimate(st, body, turn)
    response = await st.upstream.open_stream(route, payload, headers)
    stack.push_async_callback(response.aclose)

    async def complete(result: StreamResult) -> None:
        if turn is not None:
            await _commit(st, turn, result.text)

    relay = StreamRelay(
        response,
        result=StreamResult(kind=kind),
        metrics=st.metrics,
        started=started,
        wants_usage=body.wants_usage_chunk(),
        prompt_estimate=estimate,
        on_complete=complete,
    )
    reply_headers = _dropped_header(turn)
    return OwnedStream(relay.events(), resources=stack.pop_all(), headers=reply_headers)


def _dropped_header(turn: SessionTurn | None) -> dict[str, str]:
    return {DROPPED_HEADER: str(turn.fitted.dropped_turns)} if turn else {}


async def chat_completion(request: Request, body: ChatRequest, owner: str) -> Response:
    st = proxy_state(request)
    st.require_ready()
    await st.check_model(body.model)
    session_id = session_id_for(request, body)
    incoming = [normalize(m) for m in body.messages]  # text only: a 400 here, not a 5xx later
    if session_id and (body.n or 1) > 1:
        raise BadRequestError("a session keeps one reply per turn: n must be 1", param="n")
    started = time.perf_counter()
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(st.admission.admit())
        turn = None
        if session_id:
            turn = await _prepare_session(st, stack, body, incoming, owner, session_id)
            fitted = turn.fitted
        else:
            fitted = await _check_fit(st, incoming, body.requested_max_tokens())
        payload = upstream_body(body, turn.fitted.messages if turn else None)
        if turn is None:
            payload["messages"] = _forwarded(payload["messages"], incoming)
        payload["max_tokens"] = reply_limit(
            st.context, body.requested_max_tokens(), fitted.prompt_tokens
        )
        headers = backend_headers(owner, session_id)
        await stack.enter_async_context(st.admission.slot())
        route = "/v1/chat/completions"
        if body.stream:
            return await _stream(
                st, stack, route, payload, body=body, kind="chat", headers=headers,
                turn=turn, started=started,
            )  # fmt: skip
        reply = await st.upstream.post_json(route, payload, headers)
        if turn is not None:
            await _commit(st, turn, _reply_text(reply, "chat"))
        _account(st, reply, turn)
        return JSONResponse(reply, headers=_dropped_header(turn))


async def completion(request: Request, body: TextCompletionRequest, owner: str) -> Response:
    """Legacy completions: stateless, so only the queue stands between client and backend."""
    st = proxy_state(request)
    st.require_ready()
    await st.check_model(body.model)
    started = time.perf_counter()
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(st.admission.admit())
        prompt = body.prompt if isinstance(body.prompt, str) else "".join(body.prompt)
        max_tokens = body.max_tokens or COMPLETION_DEFAULT_MAX_TOKENS
        needed = await st.fitter.counter.count(prompt) + max_tokens
        if needed > usable_context(st.context):
            raise ContextLengthError(
                f"the prompt and max_tokens ({max_tokens}) need {needed} tokens, more than the "
                f"model's {st.context}-token context window less {UTF8_HOLDBACK_TOKENS} kept free",
                param="prompt",
            )
        await stack.enter_async_context(st.admission.slot())
        payload = {**upstream_body(body), "max_tokens": max_tokens}
        route = "/v1/completions"
        if body.stream:
            return await _stream(
                st, stack, route, payload, body=body, kind="completion", headers={},
                turn=None, started=started,
            )  # fmt: skip
        reply = await st.upstream.post_json(route, payload)
        _account(st, reply, None)
        return JSONResponse(reply)


async def embeddings(request: Request, body: EmbeddingRequest) -> Response:
    st = proxy_state(request)
    if not backend_info.serves_embeddings(st.backend):
        raise NotFoundError(
            "this backend does not serve embeddings (llama.cpp needs `--embedding true`)",
            code="embeddings_unsupported",
        )
    st.require_ready()
    await st.check_model(body.model)
    async with st.admission.admit():
        for text in body.texts():
            if await st.fitter.counter.count(text) > st.context:
                raise ContextLengthError(
                    f"an input is longer than the model's {st.context}-token context",
                    param="input",
                )
        async with st.admission.slot():
            reply = await st.upstream.post_json("/v1/embeddings", upstream_body(body))
    _account(st, reply, None)
    return JSONResponse(reply)
