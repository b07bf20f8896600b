"""The Conversations API's request models."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from launcher.protocol import check_plain_json
from launcher.proxy.responses.models import InputItem, typed_items

MAX_ITEMS = 20  # OpenAI's limit for items added at once


class _Checked(BaseModel):
    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _plain(cls, data: Any) -> Any:
        check_plain_json(data)
        if isinstance(data, dict) and "items" in data:
            data = {**data, "items": typed_items(data["items"])}
        return data


class CreateConversation(_Checked):
    items: list[InputItem] | None = Field(default=None, max_length=MAX_ITEMS)
    metadata: dict[str, str] | None = Field(default=None, max_length=16)


class UpdateConversation(_Checked):
    metadata: dict[str, str] = Field(max_length=16)


class CreateItems(_Checked):
    items: list[InputItem] = Field(min_length=1, max_length=MAX_ITEMS)
