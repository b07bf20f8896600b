"""Stage 3: the planned files, downloaded and verified. Entry point: `pull(plan.source)`.

`pull` is resolved on first use: it imports huggingface_hub, which planning (it reads
GGUF headers through `weights.gguf_file`) should not pay for.
"""

from __future__ import annotations

from typing import Any

__all__ = ["pull"]


def __getattr__(name: str) -> Any:
    if name == "pull":
        from launcher.weights.pull import pull

        return pull
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
