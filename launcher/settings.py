"""One settings tree: defaults < profile file < environment (LLMUP_, nested with "__") < CLI.

The CLI builds a Settings from the environment, then overrides the fields a flag was
given for; core code receives values, never reads the environment itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class PlanningSettings(BaseModel):
    backend: Literal["auto", "llama.cpp", "exllamav2"] = "auto"
    context: int = Field(default=4096, gt=0)
    kv_cache: Literal["f16", "q8_0", "q4_0"] = "f16"
    reserve_mib: int = Field(default=1024, ge=0)
    ram_reserve_mib: int = Field(default=1024, ge=0)
    allow_offload: bool = False


def default_home() -> Path:
    return Path.home() / ".local" / "share" / "llmup"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="LLMUP_", env_nested_delimiter="__", extra="ignore"
    )

    home: Path = Field(default_factory=default_home)
    planning: PlanningSettings = Field(default_factory=PlanningSettings)
