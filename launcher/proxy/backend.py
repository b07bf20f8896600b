"""What the proxy needs to know about the backend behind it, whoever runs it.

`create_app` takes any object with `base_url`, `state` and `restarts` (the supervisor has
them); `model_id`, `context`, `plan_summary`, `plan`, `embeddings` and `kind` are read when
present, with fallbacks, so a plain supervisor works and a test can hand in a `StaticBackend`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Backend(Protocol):
    """The minimum: where it listens, whether it is ready, how often it was restarted."""

    base_url: str
    restarts: int

    @property
    def state(self) -> Any: ...


@dataclass
class StaticBackend:
    """A backend someone else runs (a test's llama_cpp.server, an external worker)."""

    base_url: str
    model_id: str
    context: int
    state: str = "ready"
    restarts: int = 0
    kind: str = "llama.cpp"
    plan_summary: dict[str, Any] | None = None
    plan: dict[str, Any] | None = None
    embeddings: bool = False
    slots: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def state_of(backend: Any) -> str:
    """The state as a plain string ("ready", "restarting", ...), also from an Enum."""
    state = getattr(backend, "state", "ready")
    return str(state.value if isinstance(state, Enum) else state)


def is_ready(backend: Any) -> bool:
    return state_of(backend) == "ready"


def model_id_of(backend: Any) -> str | None:
    """The served model's id: `model_id`, else the supervisor spec's `model_alias`."""
    model_id = getattr(backend, "model_id", None)
    if model_id:
        return str(model_id)
    spec = getattr(backend, "spec", None)
    alias = getattr(spec, "model_alias", None)
    return str(alias) if alias else None


def context_of(backend: Any, default: int) -> int:
    """The backend's context window (n_ctx); `default` (the planned context) when unknown."""
    context = getattr(backend, "context", None)
    return int(context) if context else default


def kind_of(backend: Any) -> str:
    """Which engine serves: "llama.cpp" or "exllamav2" (the spec's name; llama.cpp when
    nothing says, as for an external llama_cpp.server)."""
    kind = getattr(backend, "kind", None) or getattr(getattr(backend, "spec", None), "name", None)
    return str(kind) if kind else "llama.cpp"


def restarts_of(backend: Any) -> int:
    return int(getattr(backend, "restarts", 0) or 0)


def ordered_stops_of(backend: Any) -> int:
    """How many times the supervisor stopped the backend on purpose (unhealthy kills and
    stops): connections dropped then were not the requests' fault. 0 when unsupervised."""
    return int(getattr(backend, "ordered_stops", 0) or 0)


def supervision_of(backend: Any) -> dict[str, Any]:
    """The supervisor's health-check counters and last problem, empty when unsupervised."""
    return dict(getattr(backend, "supervision", None) or {})


def plan_summary_of(backend: Any) -> dict[str, Any] | None:
    summary = getattr(backend, "plan_summary", None)
    return dict(summary) if summary else None


def plan_of(backend: Any) -> dict[str, Any] | None:
    """The whole plan the backend runs (JSON), less the fallback plans it carries along."""
    plan = getattr(backend, "plan", None)
    if plan is None:
        return None
    data = plan.model_dump(mode="json") if hasattr(plan, "model_dump") else dict(plan)
    data.pop("fallbacks", None)
    return data


def serves_embeddings(backend: Any) -> bool:
    """Only a backend that says so gets embeddings requests: llama_cpp.server started
    without `--embedding true` answers them with a 500, which must not reach a client."""
    return bool(getattr(backend, "embeddings", False))


def keeps_slots(backend: Any) -> bool:
    """A backend that keeps sessions' KV (llmup's llama.cpp worker): it is told when a
    session is deleted and its /slots figures are part of /metrics."""
    return bool(getattr(backend, "slots", False))
