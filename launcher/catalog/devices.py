"""Known GPUs and Apple chips with their peak memory bandwidth and throughput (devices.json).

The speed estimate looks devices up by the name detection reports (nvidia-smi/NVML, sysctl);
a device not in the table gets no speed figure rather than a guessed one.
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from launcher.errors import CatalogError


class DeviceSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    kind: Literal["cuda", "metal"]
    match: list[str] = Field(min_length=1)
    bandwidth_gbs: float = Field(gt=0)
    tflops: float | None = Field(default=None, gt=0)
    source: str


class DeviceTable(BaseModel):
    model_config = ConfigDict(extra="forbid")

    about: list[str] = []
    devices: list[DeviceSpec]

    def lookup(self, name: str) -> DeviceSpec | None:
        """The entry whose longest `match` substring occurs in `name` as whole words."""
        text = " ".join(name.lower().split())
        best, best_len = None, 0
        for spec in self.devices:
            for pattern in spec.match:
                if len(pattern) > best_len and _contains_word(text, pattern):
                    best, best_len = spec, len(pattern)
        return best


def _contains_word(text: str, pattern: str) -> bool:
    return re.search(rf"(?<![a-z0-9]){re.escape(pattern)}(?![a-z0-9])", text) is not None


@cache
def device_table() -> DeviceTable:
    raw = (resources.files("launcher.catalog") / "devices.json").read_text()
    try:
        return DeviceTable.model_validate_json(raw)
    except ValueError as exc:
        raise CatalogError(f"catalog file devices.json is malformed: {exc}") from None
