"""Thin routers: authenticate, validate, hand over to `chat`, the store or the metrics."""

from __future__ import annotations

from typing import Any

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from launcher.errors import NotFoundError
from launcher.protocol import ModelCard, ModelList
from launcher.proxy import chat, worker_slots
from launcher.proxy.guard import OWNER_STATE
from launcher.proxy.metrics import CONTENT_TYPE_LATEST
from launcher.proxy.request_models import ChatRequest, EmbeddingRequest, TextCompletionRequest
from launcher.proxy.state import proxy_state

bearer = HTTPBearer(auto_error=False, description="one of the proxy's API keys")

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "Bad request (OpenAI error body)"},
    401: {"description": "Missing or invalid API key"},
    404: {"description": "Unknown model or session"},
    413: {"description": "Request body too large"},
    429: {"description": "Queue full; see Retry-After"},
    502: {"description": "The backend failed"},
    503: {"description": "The backend is loading or restarting; see Retry-After"},
}


async def authenticate(
    request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)
) -> str:
    """The caller's owner id (a hash of its key), as `AccessGuard` found it before the body
    was read; 401 unless a configured key is sent."""
    owner = request.scope.get("state", {}).get(OWNER_STATE)
    if owner is not None:
        return owner
    header = f"Bearer {credentials.credentials}" if credentials else None
    return proxy_state(request).keys.owner(header)


api = APIRouter(prefix="/v1", responses=ERRORS)


@api.get("/models", response_model=ModelList)
async def list_models(request: Request, owner: str = Depends(authenticate)) -> ModelList:
    model_id = await proxy_state(request).model_id()
    return ModelList(data=[ModelCard(id=model_id)])


@api.post("/chat/completions", response_model=None)
async def create_chat_completion(
    request: Request, body: ChatRequest, owner: str = Depends(authenticate)
) -> Response:
    return await chat.chat_completion(request, body, owner)


@api.post("/completions", response_model=None)
async def create_completion(
    request: Request, body: TextCompletionRequest, owner: str = Depends(authenticate)
) -> Response:
    return await chat.completion(request, body, owner)


@api.post("/embeddings", response_model=None)
async def create_embedding(
    request: Request, body: EmbeddingRequest, owner: str = Depends(authenticate)
) -> Response:
    return await chat.embeddings(request, body, owner)


@api.get("/sessions")
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


@api.get("/sessions/{session_id}")
async def get_session(
    request: Request, session_id: str, owner: str = Depends(authenticate)
) -> dict[str, Any]:
    store = proxy_state(request).sessions
    info = await anyio.to_thread.run_sync(store.info, owner, session_id)
    if info is None:
        raise _no_session(session_id)
    history = await anyio.to_thread.run_sync(store.load, owner, session_id)
    return {**info.as_json(), "messages": history.messages()}


@api.delete("/sessions/{session_id}")
async def delete_session(
    request: Request, session_id: str, owner: str = Depends(authenticate)
) -> dict[str, Any]:
    store = proxy_state(request).sessions
    if not await anyio.to_thread.run_sync(store.delete, owner, session_id):
        raise _no_session(session_id)
    await worker_slots.forget_session(proxy_state(request), owner, session_id)
    return {"id": session_id, "object": "session.deleted", "deleted": True}


@api.get("/plan")
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
