"""What one device holds for a candidate, whatever the backend: the value placement fills."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DeviceMemory:
    """What one device (or the host, device 'cpu') holds, in bytes."""

    device: str
    weights: int = 0
    kv_cache: int = 0
    compute: int = 0
    overhead: int = 0
    layers: int = 0
    extra: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return (
            self.weights + self.kv_cache + self.compute + self.overhead + sum(self.extra.values())
        )
