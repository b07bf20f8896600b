"""The Messages API's work: translate, run through `chat.generate`, answer as Anthropic.

`max_tokens` is a ceiling, as Anthropic's is: when the prompt and it do not fit the
context, the reply is given what is left (`stop_reason: max_tokens` if it runs out).

A conversation is kept like chat's when the client names a session (`X-Session-Id`): the
client resends the whole conversation each time, as Anthropic's API wants, and the session
lines it up with what it holds (`plan_turn`), so only the new messages are evaluated on the
session's KV cache. A request without one is stateless.
"""

from __future__ import annotations

import secrets
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from launcher.proxy import chat
from launcher.proxy.context import normalize, plan_turn
from launcher.proxy.messages.convert import chat_fields, chat_messages, message_object
from launcher.proxy.messages.events import MessageStream
from launcher.proxy.messages.models import CountTokensParams, MessageCreateParams
from launcher.proxy.relay import OwnedStream
from launcher.proxy.request_models import ChatRequest
from launcher.proxy.state import ProxyState, proxy_state
from launcher.proxy.turns import SessionUse


def chat_body(params: MessageCreateParams) -> ChatRequest:
    return chat.chat_request({
        "model": params.model, "messages": chat_messages(params),
        "max_tokens": params.max_tokens, "temperature": params.temperature,
        "top_p": params.top_p, "top_k": params.top_k, "stop": params.stop_sequences,
        "stream": params.stream,
        "stream_options": {"include_usage": True} if params.stream else None,
        **chat_fields(params),
    })  # fmt: skip


def session_use(request: Request, body: ChatRequest) -> SessionUse | None:
    """The session the client names, its messages lined up with it like chat's (a resent
    request is a new turn, never a replay: a replay would be chat's reply)."""
    session_id = chat.session_id_for(request, body)
    if session_id is None:
        return None
    incoming = [normalize(m) for m in body.messages]
    return SessionUse(session_id, plan=lambda history: plan_turn(history, incoming, ""))


async def within_context(st: ProxyState, body: ChatRequest, owner: str) -> ChatRequest:
    """`max_tokens` as Anthropic's ceiling: a request whose prompt and `max_tokens` exceed
    the context is sent without it, and the reply runs at most to the end of the context
    (Claude Code asks for 32,000 tokens whatever the model)."""
    wanted = body.requested_max_tokens() or 0
    if await chat.count_prompt(st, body, owner) + wanted <= st.context:
        return body
    return body.model_copy(update={"max_tokens": None})


async def create(request: Request, params: MessageCreateParams, owner: str) -> Response:
    st = proxy_state(request)
    st.require_ready()
    await st.check_model(params.model)
    body = await within_context(st, chat_body(params), owner)
    use = session_use(request, body)
    reply, headers = await chat.generate(
        st, body, owner, use=use, headers=request.headers, api="messages"
    )
    message_id = f"msg_{secrets.token_hex(12)}"
    if isinstance(reply, OwnedStream):
        events = MessageStream(message_id, params.model).events(reply.body_iterator)
        return OwnedStream(events, resources=reply.resources, headers=headers)
    if isinstance(reply, Response):
        return reply
    return JSONResponse(message_object(message_id, params.model, reply), headers=headers)


async def count_tokens(request: Request, params: CountTokensParams, owner: str) -> dict[str, Any]:
    st = proxy_state(request)
    st.require_ready()
    await st.check_model(params.model)
    fields = {"model": params.model, "messages": chat_messages(params), **chat_fields(params)}
    return {"input_tokens": await chat.count_prompt(st, chat.chat_request(fields), owner)}
