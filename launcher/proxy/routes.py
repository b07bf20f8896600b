"""Thin routers: authenticate, validate, hand over to `chat`, the store or the metrics.

`OPENAI_ROUTES` are OpenAI's routes; `mount_api` serves them under `/v1` and, for clients
whose base URL lacks it, at the top level too (as llama.cpp's server does), each with one
handler. llmup's own `/v1` routes (`llmup_api`: sessions, the plan) and `ops` (`/health`,
`/metrics`, `/openapi.json`) are served where they are.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from launcher.errors import NotFoundError
from launcher.protocol import ModelCard, ModelList
from launcher.proxy import chat, worker_slots
from launcher.proxy.conversations.router import ROUTES as CONVERSATIONS_ROUTES
from launcher.proxy.deps import ERRORS, authenticate
from launcher.proxy.metrics import CONTENT_TYPE_LATEST
from launcher.proxy.request_models import ChatRequest, EmbeddingRequest, TextCompletionRequest
from launcher.proxy.responses.router import ROUTES as RESPONSES_ROUTES
from launcher.proxy.state import proxy_state


async def list_models(request: Request, owner: str = Depends(authenticate)) -> ModelList:
    """The served model's id first, then the other names it answers to (`--model-alias`)."""
    names = await proxy_state(request).model_names()
    return ModelList(data=[ModelCard(id=name) for name in names])


async def create_chat_completion(
    request: Request, body: ChatRequest, owner: str = Depends(authenticate)
) -> Response:
    return await chat.chat_completion(request, body, owner)


async def create_completion(
    request: Request, body: TextCompletionRequest, owner: str = Depends(authenticate)
) -> Response:
    return await chat.completion(request, body, owner)


async def create_embedding(
    request: Request, body: EmbeddingRequest, owner: str = Depends(authenticate)
) -> Response:
    return await chat.embeddings(request, body, owner)


API_PREFIX = "/v1"
llmup_api = APIRouter(prefix=API_PREFIX, responses=ERRORS)  # llmup's own: sessions, the plan
# OpenAI's routes: (method, path below the prefix, handler, response model). A route added
# here is served under both prefixes.
OPENAI_ROUTES: tuple[tuple[str, str, Callable[..., Any], Any], ...] = (
    ("GET", "/models", list_models, ModelList),
    ("POST", "/chat/completions", create_chat_completion, None),
    ("POST", "/completions", create_completion, None),
    ("POST", "/embeddings", create_embedding, None),
    *RESPONSES_ROUTES,
    *CONVERSATIONS_ROUTES,
)


def openai_router(prefix: str, *, documented: bool) -> APIRouter:
    """OpenAI's routes under `prefix`, each registered with its one handler. The router
    carries the prefix itself (not `include_router(prefix=...)`), so every route's template
    is its full path: the metrics label `/chat/completions` apart from `/v1/...`."""
    router = APIRouter(prefix=prefix, responses=ERRORS, include_in_schema=documented)
    for method, path, handler, model in OPENAI_ROUTES:
        router.add_api_route(path, handler, methods=[method], response_model=model)
    return router


def mount_api(app: FastAPI) -> None:
    """OpenAI's routes under `/v1` (documented) and at the top level for base URLs typed
    without it (as llama.cpp's server does; not documented twice: `/openapi.json` lists each
    route once), then llmup's own `/v1` routes."""
    app.include_router(openai_router(API_PREFIX, documented=True))
    app.include_router(openai_router("", documented=False))
    app.include_router(llmup_api)


@llmup_api.get("/sessions")
async def list_sessions(request: Request, owner: str = Depends(authenticate)) -> dict[str, Any]:
    store = proxy_state(request).sessions
    infos = await anyio.to_thread.run_sync(store.list_sessions, owner)
    return {"object": "list", "data": [info.as_json() for info in infos]}


def _no_session(session_id: str) -> NotFoundError:
    return NotFoundError(
        f"no session `{session_id}` (it never existed, expired, was deleted, or belongs to "
        "another API key)",
        param="session_id",
        code="session_not_found",
    )


@llmup_api.get("/sessions/{session_id}")
async def get_session(
    request: Request, session_id: str, owner: str = Depends(authenticate)
) -> dict[str, Any]:
    store = proxy_state(request).sessions
    info = await anyio.to_thread.run_sync(store.info, owner, session_id)
    if info is None:
        raise _no_session(session_id)
    history = await anyio.to_thread.run_sync(store.load, owner, session_id)
    return {**info.as_json(), "messages": history.messages()}


@llmup_api.delete("/sessions/{session_id}")
async def delete_session(
    request: Request, session_id: str, owner: str = Depends(authenticate)
) -> dict[str, Any]:
    store = proxy_state(request).sessions
    if not await anyio.to_thread.run_sync(store.delete, owner, session_id):
        raise _no_session(session_id)
    await worker_slots.forget_session(proxy_state(request), owner, session_id)
    return {"id": session_id, "object": "session.deleted", "deleted": True}


@llmup_api.get("/plan")
async def get_plan(request: Request, owner: str = Depends(authenticate)) -> dict[str, Any]:
    """The served model and the plan it runs (null when started without one); read-only."""
    st = proxy_state(request)
    return {
        "object": "plan",
        "model": st.backend.model_id,
        "context": st.context,
        "plan": st.backend.plan_json,
    }


ops = APIRouter()


@ops.get("/health", responses={503: {"description": "Loading, restarting or down"}})
async def health(request: Request) -> JSONResponse:
    """200 when the backend is ready, 503 otherwise; open to probes (no key needed). Only
    the status without a key when keys are set (what a load balancer needs); the model, the
    plan and the backend's last problem with one."""
    st = proxy_state(request)
    backend = st.backend
    ready = st.ready
    status = {"status": "ok" if ready else "unavailable"}
    if not st.keys.may_see(request.headers.get("authorization")):
        return JSONResponse(status, status_code=200 if ready else 503)
    body = {
        **status,
        "backend": {
            **backend.supervision,
            "state": backend.state,
            "restarts": backend.restarts,
        },
        "model": backend.model_id,
        "replica": st.proxy.replica_name,
        "sessions_store": st.sessions.kind,
        "context": st.context,
        "context_policy": st.proxy.context_policy,
        "plan": backend.plan_summary,
    }
    return JSONResponse(body, status_code=200 if ready else 503)


@ops.get("/openapi.json", include_in_schema=False)
async def openapi_schema(request: Request, owner: str = Depends(authenticate)) -> JSONResponse:
    """The API's OpenAPI document; behind the key like the API it describes."""
    return JSONResponse(request.app.openapi())


@ops.get("/metrics", response_class=Response)
async def metrics(request: Request, owner: str = Depends(authenticate)) -> Response:
    st = proxy_state(request)
    await worker_slots.refresh_slot_metrics(st)
    data = await anyio.to_thread.run_sync(st.metrics.render)
    return Response(data, media_type=CONTENT_TYPE_LATEST)
