"""The generation routes' work: check, admit, (for a session) lock, load, fit, forward, commit.

Order matters. Everything the request alone decides (what the backend supports, grammars,
token ids) is checked first. Then the queue place is taken (429 when there is none), then
the session's lock (one request per session at a time), then the history is fitted to the
context, and only then a place at the backend. Everything that can refuse a request does
so before a stream starts, so a client gets a plain JSON error instead of a broken stream.

Only fields the proxy knows are forwarded (see `upstream_body`), and a request that was at
the backend when it crashed is never forwarded again (`launcher.proxy.crashes`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from contextlib import AsyncExitStack
from functools import partial
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import ValidationError

from launcher.api_errors import describe_validation
from launcher.errors import (
    BackendDroppedError,
    BadRequestError,
    ContextLengthError,
    NotFoundError,
)
from launcher.protocol import backend_headers
from launcher.proxy import turns
from launcher.proxy.checks import check_logit_bias, check_supported
from launcher.proxy.context import normalize
from launcher.proxy.crashes import request_digest
from launcher.proxy.prompt_fit import FitRequest, Fitted, check_fits
from launcher.proxy.relay import OwnedStream, StreamRelay, StreamResult
from launcher.proxy.replies import ReplyResponse, conform_reply, replay_events
from launcher.proxy.request_models import (
    SESSION_ID,
    ChatRequest,
    EmbeddingRequest,
    TextCompletionRequest,
)
from launcher.proxy.state import ProxyState, proxy_state
from launcher.proxy.store import Conversation, Message
from launcher.proxy.turns import SessionTurn, SessionUse
from launcher.served import WorkerKind

SESSION_HEADER = "X-Session-Id"


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


# The fields of a chat request that the chat template reads (besides the messages): what the
# backend needs to count its prompt.
TEMPLATE_FIELDS = (
    "model", "tools", "tool_choice", "functions", "function_call", "response_format",
)  # fmt: skip


def upstream_body(body: Any, messages: list[Message] | None = None) -> dict[str, Any]:
    """The request as the backend gets it: the fields the proxy knows and checked (unknown
    ones are dropped, `session_id` too), without nulls (OpenAI reads an explicit null as
    "the default"; llama_cpp.server refuses it), usage asked for in streams (the proxy drops
    it again unless the client asked too), and `max_tokens` only when the client set a limit
    (either name): without one the backend gives the reply the rest of its context."""
    known = set(type(body).model_fields) - {"session_id", "max_completion_tokens", "max_tokens"}
    payload = body.model_dump(
        mode="json", exclude_unset=True, exclude_none=True, by_alias=True, include=known
    )
    wanted = getattr(body, "requested_max_tokens", lambda: None)()
    if wanted is not None:
        payload["max_tokens"] = wanted
    if messages is not None:
        payload["messages"] = [{k: v for k, v in m.items() if v is not None} for m in messages]
    if payload.get("stream"):
        payload["stream_options"] = {**(payload.get("stream_options") or {}), "include_usage": True}
    return payload


def chat_request(fields: dict[str, Any]) -> ChatRequest:
    """A chat request made by translating another API's request (None fields left out);
    400 for what chat cannot take, named as the chat request names it."""
    try:
        return ChatRequest.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        message, param, code = describe_validation(list(exc.errors()))
        raise BadRequestError(message, param=param, code=code) from exc


async def count_prompt(st: ProxyState, body: ChatRequest, owner: str) -> int:
    """The request's prompt length as the backend counts it (its template, its tokenizer)."""
    payload = upstream_body(body)
    ask = {k: payload[k] for k in (*TEMPLATE_FIELDS, "messages") if k in payload}
    counted = await st.fitter.counter.count(ask, owner=owner)
    if counted is None:
        raise BadRequestError(
            "this backend cannot count prompts (an older worker image)", code="unsupported"
        )
    return counted.prompt_tokens


def for_backend(st: ProxyState, payload: dict[str, Any]) -> dict[str, Any]:
    """llama_cpp.server takes no `json_schema` response format: it gets the same schema
    as its own `json_object` + `schema`, which constrains the reply alike."""
    response_format = payload.get("response_format") or {}
    if st.backend.kind is WorkerKind.LLAMACPP_PYTHON and "json_schema" in response_format:
        schema = response_format["json_schema"].get("schema")
        payload["response_format"] = {"type": "json_object"}
        if schema is not None:
            payload["response_format"]["schema"] = schema
    return payload


def fit_request(st: ProxyState, body: Any, *, session: bool) -> FitRequest:
    """What a chat request asks of the context: its max_tokens, else (in a session, where
    old turns can make room) the default reserve for the reply, else one token."""
    wanted = body.requested_max_tokens()
    reserve = wanted or 1
    if session and wanted is None:
        reserve = min(st.proxy.default_reserve_tokens, st.context // 4)
    template = for_backend(st, upstream_body(body))
    return FitRequest(
        reserve=reserve,
        minimum=wanted or 1,
        template={k: template[k] for k in TEMPLATE_FIELDS if k in template},
    )


def cap_reply_tokens(body: Any, limit: int | None) -> None:
    """The server's reply limit (`proxy.max_tokens`, llama-server's `-n`): what a request
    that sets none gets, and the most one may ask for."""
    if limit is None:
        return
    asked = body.requested_max_tokens()
    if asked is None or asked > limit:
        body.max_tokens = limit
        if hasattr(body, "max_completion_tokens"):
            body.max_completion_tokens = None


async def _check_request(st: ProxyState, body: Any) -> None:
    """What the backend cannot do, or would crash on, refused before any queueing."""
    check_supported(body, st.backend.kind, max_messages=st.proxy.max_request_messages)
    if body.logit_bias:
        check_logit_bias(body, (await st.backend_meta()).get("n_vocab"))
    await st.grammar.check_request(body, st.backend.kind)


async def _check_fit(
    st: ProxyState, body: ChatRequest, messages: list[Message], owner: str
) -> Fitted:
    """A stateless request whose prompt (as the backend counts it) and max_tokens cannot fit
    is refused (400) before anything streams; without max_tokens one reply token must fit,
    the reply then gets what is left. llmup's own workers refuse it themselves, with the same
    count and the same error, before their stream starts: the proxy asks them nothing first
    (a round trip per request saved)."""
    if st.backend.kind.llmup_worker:
        return Fitted(messages, 0, 0, None)
    ask = fit_request(st, body, session=False)
    return await st.fitter.fit(Conversation(), 0, messages, ask, hint=st.context, owner=owner)


def _account(st: ProxyState, reply: dict[str, Any], api: str) -> None:
    usage = reply.get("usage") if isinstance(reply.get("usage"), dict) else {}
    st.metrics.count_tokens(usage.get("prompt_tokens"), usage.get("completion_tokens"), api)


async def _forward(
    st: ProxyState,
    stack: AsyncExitStack,
    route: str,
    payload: dict[str, Any],
    *,
    body: Any,
    owner: str,
    headers: dict[str, str] | None = None,
    turn: SessionTurn | None = None,
    api: str = "chat",
) -> dict[str, Any] | Response:
    """Send the request (once a backend place is free): its JSON reply, as OpenAI's schema
    has it, or for a stream the relaying response, which from then on owns what `stack`
    holds. The fingerprint is known before anything is sent, so asking for it never costs
    a generated reply."""
    kind = "chat" if "messages" in payload else "completion"
    fingerprint = await st.fingerprint()
    digest = request_digest(route, payload)
    st.crashes.refuse_known(owner, digest)
    await stack.enter_async_context(st.admission.slot(owner))
    ticket = stack.enter_context(st.crashes.inflight(owner, digest))
    started = time.perf_counter()
    try:
        if not body.stream:
            reply = await st.upstream.post_json(route, payload, headers)
            return conform_reply(reply, kind, fingerprint)
        response = await st.upstream.open_stream(route, payload, headers)
    except BackendDroppedError:
        st.crashes.backend_dropped(ticket)
        raise
    stack.push_async_callback(response.aclose)

    async def complete(result: StreamResult) -> None:
        if turn is not None:
            await turns.commit(st, turn, result.reply())

    relay = StreamRelay(
        response,
        result=StreamResult(kind=kind),
        fingerprint=fingerprint,
        metrics=st.metrics,
        started=started,
        wants_usage=body.wants_usage_chunk(),
        on_complete=complete,
        on_backend_drop=partial(st.crashes.backend_dropped, ticket),
        api=api,
    )
    reply_headers = turn.headers() if turn else {}
    return OwnedStream(relay.events(), resources=stack.pop_all(), headers=reply_headers)


def _replay(turn: SessionTurn, body: ChatRequest) -> Response:
    """A retry of the session's last turn: the stored reply, nothing generated or stored."""
    if body.stream:
        events = replay_events(turn.retry, body.wants_usage_chunk())
        return StreamingResponse(events, media_type="text/event-stream", headers=turn.headers())
    return ReplyResponse(conform_reply(dict(turn.retry), "chat"), headers=turn.headers())


async def chat_completion(request: Request, body: ChatRequest, owner: str) -> Response:
    st = proxy_state(request)
    st.require_ready()
    body.model = await st.check_model(body.model)  # an alias: the backend gets the id
    session_id = session_id_for(request, body)
    use = SessionUse(session_id) if session_id else None
    reply, headers = await generate(st, body, owner, use=use, headers=request.headers)
    if isinstance(reply, Response):
        return reply
    return ReplyResponse(reply, headers=headers)


async def generate(
    st: ProxyState,
    body: ChatRequest,
    owner: str,
    *,
    use: SessionUse | None,
    headers: Mapping[str, str],
    api: str = "chat",
) -> tuple[dict[str, Any] | Response, dict[str, str]]:
    """One chat request through every check, the queue, the session (when `use` names one)
    and the backend: the reply (OpenAI's chat object) and the session's headers, or for a
    stream the relaying response. The Responses and Messages APIs translate to this too, so
    every API gets the same checks, limits, sessions, crash memory and metrics."""
    cap_reply_tokens(body, st.proxy.max_tokens)
    await _check_request(st, body)
    incoming = [normalize(m) for m in body.messages]
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(st.admission.admit(owner))
        turn = None
        if use is not None:
            turn = await turns.prepare(
                st, stack, body, incoming, fit_request(st, body, session=True),
                owner=owner, use=use, headers=headers,
            )  # fmt: skip
            if turn.retry is not None:
                return _replay(turn, body), {}
            fitted = turn.fitted
        else:
            fitted = await _check_fit(st, body, incoming, owner)
        payload = for_backend(st, upstream_body(body, fitted.messages))
        private = backend_headers(owner, use.session_id if use else None)
        route = "/v1/chat/completions"
        reply = await _forward(
            st, stack, route, payload, body=body, owner=owner, headers=private, turn=turn,
            api=api,
        )  # fmt: skip
        if isinstance(reply, Response):
            return reply, {}
        if turn is not None:
            await turns.commit(st, turn, reply)
        _account(st, reply, api)
        return reply, turn.headers() if turn else {}


async def completion(request: Request, body: TextCompletionRequest, owner: str) -> Response:
    """Legacy completions: stateless, so only the queue stands between client and backend.
    Without max_tokens the backend gives OpenAI's 16 tokens, or what the context has left."""
    st = proxy_state(request)
    st.require_ready()
    body.model = await st.check_model(body.model)  # an alias: the backend gets the id
    cap_reply_tokens(body, st.proxy.max_tokens)
    await _check_request(st, body)
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(st.admission.admit(owner))
        if not st.backend.kind.llmup_worker:  # llmup's workers refuse it themselves
            prompt = body.prompt if isinstance(body.prompt, str) else "".join(body.prompt)
            counted = await st.fitter.counter.count(
                {"model": body.model, "prompt": prompt}, owner=owner
            )
            check_fits(counted, body.max_tokens or 1, "prompt")
        payload = upstream_body(body)
        reply = await _forward(
            st, stack, "/v1/completions", payload, body=body, owner=owner,
            headers=backend_headers(owner, None), api="completions",
        )  # fmt: skip
        if isinstance(reply, Response):
            return reply
        _account(st, reply, "completions")
        return ReplyResponse(reply)


async def embeddings(request: Request, body: EmbeddingRequest, owner: str) -> Response:
    st = proxy_state(request)
    if not st.backend.embeddings:
        raise NotFoundError(
            "this backend does not serve embeddings (llama.cpp needs `--embedding true`)",
            code="embeddings_unsupported",
        )
    st.require_ready()
    body.model = await st.check_model(body.model)  # an alias: the backend gets the id
    async with st.admission.admit(owner):
        for text in body.texts():
            if await st.tokens.count(text, owner=owner) > st.context:
                raise ContextLengthError(
                    f"an input is longer than the model's {st.context}-token context",
                    param="input",
                )
        async with st.admission.slot(owner):
            reply = await st.upstream.post_json("/v1/embeddings", upstream_body(body))
    _account(st, reply, "embeddings")
    return ReplyResponse(reply)
