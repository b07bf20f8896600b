"""`/v1/messages` routes: authenticate (`x-api-key` or a bearer key), validate, hand over
to `serving`. `anthropic-version` and `anthropic-beta` are accepted and not checked."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from launcher.proxy.deps import ERRORS, authenticate
from launcher.proxy.messages import serving
from launcher.proxy.messages.models import CountTokensParams, MessageCreateParams

router = APIRouter(prefix="/v1", responses=ERRORS, tags=["messages"])


@router.post("/messages", response_model=None)
async def create_message(
    request: Request, body: MessageCreateParams, owner: str = Depends(authenticate)
) -> Response:
    return await serving.create(request, body, owner)


@router.post("/messages/count_tokens")
async def count_tokens(
    request: Request, body: CountTokensParams, owner: str = Depends(authenticate)
) -> dict[str, Any]:
    return await serving.count_tokens(request, body, owner)
