"""What every router's handlers share: the caller's owner (its key, as the access guard
found it) and the errors the API documents. Below the routers, so the Responses,
Conversations and Messages packages and `routes` import it without importing each other."""

from __future__ import annotations

from typing import Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from launcher.proxy.guard import OWNER_STATE
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
