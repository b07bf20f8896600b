"""The Responses API's work: a request resolved against the stored state, translated to a
chat request, run through `chat.generate`, and answered as a Response (or its events).

Where a response's turn goes:

- `previous_response_id` naming the latest response of its chain: the next turn of that
  chain's session, on the sequence holding its KV cache (nothing of the history is read
  again: `usage.input_tokens_details.cached_tokens` says how much was reused);
- naming an older response: a new session, a branch holding the history up to that
  response (its KV is rebuilt; the original chain is not touched);
- `conversation`: the next turn of that conversation's session;
- neither: a new session, the chain's first response (the session's id is the response's);
- `store: false`: no session at all; a stateless chat request carrying the history the
  request refers to, and nothing is kept.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from launcher.errors import BadRequestError, NotFoundError, SessionConflictError
from launcher.proxy import chat, worker_slots
from launcher.proxy.context import TurnPlan
from launcher.proxy.relay import OwnedStream
from launcher.proxy.replica import routed_id
from launcher.proxy.request_models import ChatRequest
from launcher.proxy.responses.events import ResponseStream
from launcher.proxy.responses.items import input_items, messages_of, page
from launcher.proxy.responses.models import CreateResponse, ResponseInput
from launcher.proxy.responses.objects import ResponseBuilder, ResponseHead
from launcher.proxy.state import ProxyState, proxy_state
from launcher.proxy.store import Conversation, Message, ResponseRecord
from launcher.proxy.turns import SessionUse


@dataclass(frozen=True)
class Prior:
    """The stored state a request continues: the session and how many of its turns."""

    session_id: str
    history: Conversation
    turns: int  # the turns the request continues from (all of them for a conversation)
    latest: bool  # whether those are all the session's turns


def no_response(response_id: str, param: str = "response_id") -> NotFoundError:
    return NotFoundError(
        f"Response with id '{response_id}' not found (it never existed, was deleted, expired "
        "with its session, was made with store: false, or belongs to another API key)",
        param=param,
        code="response_not_found" if param == "response_id" else "previous_response_not_found",
    )


def no_conversation(conversation_id: str, param: str = "conversation_id") -> NotFoundError:
    return NotFoundError(
        f"Conversation with id '{conversation_id}' not found (it never existed, was deleted, "
        "expired, or belongs to another API key)",
        param=param,
        code="conversation_not_found",
    )


async def prior_of(st: ProxyState, owner: str, body: ResponseInput) -> Prior | None:
    """The stored state the request continues (404 for an id this key does not own)."""
    load = st.sessions.load
    if body.previous_response_id:
        found = await anyio.to_thread.run_sync(
            st.sessions.response, owner, body.previous_response_id
        )
        if found is None:
            raise no_response(body.previous_response_id, "previous_response_id")
        history = await anyio.to_thread.run_sync(load, owner, found.session)
        turns = found.turn + 1
        return Prior(found.session, history, turns, len(history.turns) == turns)
    conversation = body.conversation_id()
    if conversation:
        if await anyio.to_thread.run_sync(st.sessions.conversation, owner, conversation) is None:
            raise no_conversation(conversation, "conversation")
        history = await anyio.to_thread.run_sync(load, owner, conversation)
        return Prior(conversation, history, len(history.turns), True)
    return None


def system_message(body: ResponseInput, texts: list[str]) -> Message | None:
    """`instructions` and the input's system/developer messages, as one system message."""
    parts = [body.instructions or "", *texts]
    text = "\n\n".join(p for p in parts if p)
    return {"role": "system", "content": text} if text else None


def chat_body(body: ResponseInput, messages: list[Message], **fields: Any) -> ChatRequest:
    """The chat request a Responses request becomes (400 for what chat cannot take)."""
    fields = {"model": body.model or "", "messages": messages, **fields}
    if body.tools:
        fields["tools"] = [
            {"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
            for t in body.tools
        ]
    if body.tools and body.parallel_tool_calls is not None:
        fields["parallel_tool_calls"] = body.parallel_tool_calls
    choice = body.tool_choice
    if choice is not None:
        fields["tool_choice"] = (
            choice if isinstance(choice, str)
            else {"type": "function", "function": {"name": choice.name}}
        )  # fmt: skip
    text_format = body.text.format if body.text else None
    if text_format is not None and text_format.type == "json_object":
        fields["response_format"] = {"type": "json_object"}
    elif text_format is not None and text_format.type == "json_schema":
        schema = {
            "name": text_format.name or "response",
            "schema": text_format.schema_,
            "strict": text_format.strict,
            "description": text_format.description,
        }
        fields["response_format"] = {"type": "json_schema", "json_schema": schema}
    return chat.chat_request(fields)


def appending(
    messages: list[Message], system: Message | None, expected: int | None
) -> Callable[[Conversation], TurnPlan]:
    """The turn plan of a request that adds `messages` after `expected` turns (any number,
    for None); 409 when the chain moved on while the request waited for its lock."""

    def plan(history: Conversation) -> TurnPlan:
        keep = len(history.turns)
        if expected is not None and keep != expected:
            raise SessionConflictError(
                "previous_response_id is no longer the latest response of its chain (another "
                "request continued it meanwhile); send the request again to branch from it",
                param="previous_response_id",
            )
        changed = system if system != history.system else None
        return TurnPlan(system=changed, messages=list(messages), keep=keep)

    return plan


def session_use(
    head: ResponseHead, prior: Prior | None, plan: Callable[[Conversation], TurnPlan],
    respond: Callable[[Any], ResponseRecord],
) -> SessionUse:  # fmt: skip
    """Which session the response's turn goes to (see the module's doc)."""
    if prior is None:
        return SessionUse(head.id, plan=plan, respond=respond)
    if prior.latest:
        return SessionUse(prior.session_id, plan=plan, respond=respond)
    h = prior.history
    base = Conversation(h.system, h.turns[: prior.turns], h.records[: prior.turns])
    return SessionUse(head.id, plan=plan, base=base, respond=respond)


def stateless_messages(
    prior: Prior | None, system: Message | None, new: list[Message]
) -> list[Message]:
    """The whole conversation, for a request that keeps nothing."""
    history: list[Message] = []
    system = system or (prior.history.system if prior else None)
    if prior is not None:
        history = [m for turn in prior.history.turns[: prior.turns] for m in turn]
    return ([system] if system else []) + history + new


async def create(request: Request, body: CreateResponse, owner: str) -> Response:
    st = proxy_state(request)
    st.require_ready()
    await st.check_model(body.model)
    items = body.items()
    texts, new = messages_of(items)
    if not new:
        raise BadRequestError("`input` holds no message or function call output", param="input")
    system = system_message(body, texts)
    prior = await prior_of(st, owner, body)
    head = ResponseHead(routed_id("resp", st.proxy.replica_name), int(time.time()), body.model,
                        body)  # fmt: skip
    builder = ResponseBuilder(head)
    sampling = {
        "max_tokens": body.max_output_tokens, "temperature": body.temperature,
        "top_p": body.top_p, "stream": body.stream,
        "stream_options": {"include_usage": True} if body.stream else None,
    }  # fmt: skip
    if body.store:
        listed = input_items(items)
        record = lambda reply: ResponseRecord(  # noqa: E731
            head.id, head.created_at, builder.finish(reply), listed
        )
        expected = prior.turns if prior and body.previous_response_id and prior.latest else None
        use = session_use(head, prior, appending(new, system, expected), record)
        request_body = chat_body(body, new, **sampling)
    else:
        use = None
        request_body = chat_body(body, stateless_messages(prior, system, new), **sampling)
    reply, headers = await chat.generate(
        st, request_body, owner, use=use, headers=request.headers, api="responses"
    )
    if isinstance(reply, OwnedStream):
        events = ResponseStream(builder).events(reply.body_iterator)
        return OwnedStream(events, resources=reply.resources, headers=headers)
    if isinstance(reply, Response):  # never a replay: the plans above make none
        return reply
    return JSONResponse(builder.finish(reply), headers=headers)


async def retrieve(request: Request, response_id: str, owner: str) -> dict[str, Any]:
    st = proxy_state(request)
    found = await anyio.to_thread.run_sync(st.sessions.response, owner, response_id)
    if found is None:
        raise no_response(response_id)
    return found.record.body


async def delete(request: Request, response_id: str, owner: str) -> dict[str, Any]:
    """Delete a stored response; the last one of a chain takes its session (and KV) along."""
    st = proxy_state(request)
    deleted, session = await anyio.to_thread.run_sync(st.sessions.delete_response, owner,
                                                      response_id)  # fmt: skip
    if not deleted:
        raise no_response(response_id)
    if session is not None:
        await worker_slots.forget_session(st, owner, session)
    return {"id": response_id, "object": "response", "deleted": True}


async def list_input_items(
    request: Request, response_id: str, owner: str, *, limit: int, order: str, after: str | None
) -> dict[str, Any]:
    st = proxy_state(request)
    found = await anyio.to_thread.run_sync(st.sessions.response, owner, response_id)
    if found is None:
        raise no_response(response_id)
    return page(found.record.input, limit=limit, order=order, after=after)


async def input_tokens(request: Request, body: ResponseInput, owner: str) -> dict[str, Any]:
    """The prompt's length as the backend counts it, history included, nothing generated."""
    st = proxy_state(request)
    st.require_ready()
    if body.model is None:
        body = body.model_copy(update={"model": await st.model_id()})
    await st.check_model(body.model or "")
    texts, new = messages_of(body.items())
    prior = await prior_of(st, owner, body)
    messages = stateless_messages(prior, system_message(body, texts), new)
    if not messages:
        raise BadRequestError("`input` holds nothing to count", param="input")
    counted = await chat.count_prompt(st, chat_body(body, messages), owner)
    return {"object": "response.input_tokens", "input_tokens": counted}
