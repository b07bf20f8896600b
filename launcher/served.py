"""The one seam between `serve` and the proxy: what the proxy knows of the model it serves.

`create_app(settings, served, sessions)` takes a `ServedModel`: every field is required and
typed, so the proxy reads attributes, never guesses with fallbacks. `serve` hands in the
supervised backend (`launcher.serve.SupervisedModel`); a test, or a worker someone else runs,
hands in a `StaticBackend`.

Which worker serves is one `WorkerKind`, decided once from the plan (`WorkerKind.of`): the
launch starts that worker's module, and the proxy lets through what that worker can do.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

from launcher.errors import UsageError

READY = "ready"  # the state in which a backend takes requests


class WorkerKind(str, Enum):
    """The process behind the proxy (values are what replies' fingerprints and /health name)."""

    LLAMACPP_SLOTS = "llama.cpp-slots"  # llmup's session-slot worker (GGUF, the default)
    LLAMACPP_PYTHON = "llama.cpp"  # llama-cpp-python's server (--llamacpp-impl server)
    EXLLAMAV2 = "exllamav2"  # llmup's GPTQ worker

    def __str__(self) -> str:
        return self.value

    @property
    def keeps_slots(self) -> bool:
        """It keeps each session's KV cache: told when a session is deleted, its /slots
        figures part of /metrics."""
        return self is WorkerKind.LLAMACPP_SLOTS

    @property
    def llmup_worker(self) -> bool:
        """One of llmup's own workers (`workers/api.py`): it refuses a prompt that cannot fit
        with the proxy's own 400 `context_length_exceeded` (the same count, message, code
        and param), and streams chunks already in OpenAI's shape with the reply's
        `system_fingerprint`; so for a stateless request the proxy needs no count of its
        own, and relays the stream's events as they come."""
        return self is not WorkerKind.LLAMACPP_PYTHON

    @classmethod
    def of(cls, backend: str, llamacpp_impl: str | None) -> WorkerKind:
        """The worker for a plan's backend: GGUF goes to llmup's session-slot worker unless
        the plan names llama-cpp-python's server."""
        if backend == "llama.cpp":
            return cls.LLAMACPP_PYTHON if llamacpp_impl == "server" else cls.LLAMACPP_SLOTS
        if backend == "exllamav2":
            return cls.EXLLAMAV2
        raise UsageError(f"llmup cannot launch the {backend!r} backend")


class ServedModel(Protocol):
    """The backend behind the proxy: where it listens and how it is doing (live), what it
    serves (fixed for its life)."""

    @property
    def base_url(self) -> str: ...

    @property
    def auth_headers(self) -> Mapping[str, str]:
        """What every request to it carries (the per-run backend key)."""
        ...

    @property
    def state(self) -> str:
        """ "ready", "starting", "loading", "restarting", "failed", "stopped"..."""
        ...

    @property
    def restarts(self) -> int: ...

    @property
    def ordered_stops(self) -> int:
        """Stops the supervisor ordered (connections dropped then were not the requests')."""
        ...

    @property
    def supervision(self) -> Mapping[str, Any]:
        """The supervisor's health-check counters and last problem (empty: unsupervised)."""
        ...

    @property
    def model_id(self) -> str: ...

    @property
    def context(self) -> int:
        """The context window of one request (n_ctx per sequence)."""
        ...

    @property
    def kind(self) -> WorkerKind: ...

    @property
    def embeddings(self) -> bool:
        """Whether it answers /v1/embeddings (llama_cpp.server without `--embedding true`
        answers them with a 500, which must not reach a client)."""
        ...

    @property
    def plan_json(self) -> dict[str, Any] | None:
        """The whole plan it runs (JSON), less the fallback plans it carries along."""
        ...

    @property
    def plan_summary(self) -> dict[str, Any] | None:
        """What /health shows of the plan."""
        ...


@dataclass
class StaticBackend:
    """A backend someone else runs (a test's llama_cpp.server, an external worker): a
    ServedModel whose figures are whatever it is given."""

    base_url: str
    model_id: str
    context: int
    state: str = READY
    restarts: int = 0
    kind: WorkerKind = WorkerKind.LLAMACPP_PYTHON
    plan_summary: dict[str, Any] | None = None
    plan_json: dict[str, Any] | None = None
    embeddings: bool = False
    auth_headers: dict[str, str] = field(default_factory=dict)
    ordered_stops: int = 0
    supervision: dict[str, Any] = field(default_factory=dict)
