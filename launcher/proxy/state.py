"""Everything one proxy app holds, kept on `app.state.proxy` (never in module globals), so
tests and a second app in the same process each get their own."""

from __future__ import annotations

import asyncio
import weakref
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from launcher import __version__
from launcher.errors import NotFoundError
from launcher.protocol import META_PATH, system_fingerprint
from launcher.proxy.auth import KeyRing
from launcher.proxy.crashes import CrashMemory
from launcher.proxy.grammar import GrammarChecker
from launcher.proxy.limits import Admission
from launcher.proxy.metrics import Metrics
from launcher.proxy.prompt_fit import ContextFitter, PromptCounter, TokenCounter
from launcher.proxy.store import SessionStore
from launcher.proxy.upstream import Upstream
from launcher.served import READY, ServedModel
from launcher.settings import ANY_MODEL, ProxySettings, Settings


@dataclass
class ProxyState:
    settings: Settings
    backend: ServedModel
    sessions: SessionStore
    keys: KeyRing
    metrics: Metrics
    admission: Admission
    upstream: Upstream
    fitter: ContextFitter
    tokens: TokenCounter
    crashes: CrashMemory
    grammar: GrammarChecker = field(default_factory=GrammarChecker)
    _locks: weakref.WeakValueDictionary = field(default_factory=weakref.WeakValueDictionary)
    _meta: tuple[int, dict[str, Any]] | None = None
    _fingerprint: tuple[dict[str, Any], str] | None = None  # (the meta it is of, the value)

    @classmethod
    def build(
        cls, settings: Settings, backend: ServedModel, sessions: SessionStore, keys: KeyRing
    ) -> ProxyState:
        proxy = settings.proxy
        upstream = Upstream(
            backend, timeout_s=proxy.backend_timeout_s, retry_after_s=proxy.retry_after_s
        )
        metrics = Metrics()
        return cls(
            settings=settings,
            backend=backend,
            sessions=sessions,
            keys=keys,
            metrics=metrics,
            admission=Admission(
                max_inflight=proxy.max_inflight,
                queue_size=proxy.queue_size,
                retry_after_s=proxy.retry_after_s,
                per_key=proxy.max_requests_per_key,
                on_reject=metrics.rejected.inc,
            ),
            upstream=upstream,
            fitter=ContextFitter(
                PromptCounter(upstream),
                policy=proxy.context_policy,
                allowance=proxy.message_overhead_tokens,
            ),
            tokens=TokenCounter(upstream),
            crashes=CrashMemory(ordered_stops=lambda: backend.ordered_stops),
        )

    @property
    def proxy(self) -> ProxySettings:
        return self.settings.proxy

    @property
    def context(self) -> int:
        return self.backend.context

    @property
    def ready(self) -> bool:
        """The backend is ready to take requests."""
        return self.backend.state == READY

    def require_ready(self) -> None:
        """503 with Retry-After unless the backend is ready to take requests."""
        if not self.ready:
            raise self.upstream.unavailable(f"it is {self.backend.state}")

    async def model_id(self) -> str:
        """The served model's id."""
        return self.backend.model_id

    async def model_names(self) -> list[str]:
        """Every name the served model answers to: its id, then the aliases (`--model-alias`;
        the wildcard `*` is a rule, not a name, so it is not listed)."""
        served = await self.model_id()
        aliases = [name for name in self.proxy.model_aliases if name not in (served, ANY_MODEL)]
        return [served, *aliases]

    async def check_model(self, name: str) -> str:
        """The served model's id for `name` (its id or an alias; any name with the alias `*`),
        else 404 `model_not_found` naming what is served: a model the client did not ask for
        is never substituted silently."""
        names = await self.model_names()
        if name in names or ANY_MODEL in self.proxy.model_aliases:
            return names[0]
        listed = ", ".join(f"`{n}`" for n in names)
        raise NotFoundError(
            f"the model `{name}` does not exist; this server serves {listed} (GET /v1/models; "
            "`llmup serve --model-alias NAME` adds a name)",
            param="model",
            code="model_not_found",
        )

    async def backend_meta(self) -> dict[str, Any]:
        """The worker's facts (`n_vocab`, `n_ctx`, `identity`), asked once per backend
        start; empty when the backend does not tell (llama_cpp.server on its own)."""
        restarts = self.backend.restarts
        if self._meta is None or self._meta[0] != restarts:
            self._meta = (restarts, await self.upstream.get_json(META_PATH) or {})
        return self._meta[1]

    async def fingerprint(self) -> str:
        """The replies' `system_fingerprint`: this llmup and the build the worker reports
        (backend and version, model file, load settings), else what the proxy knows of it;
        the same for every reply until the backend or the model changes (so it is kept
        with the worker's facts it was made of, and made again once they are asked again)."""
        meta = await self.backend_meta()
        if self._fingerprint is not None and self._fingerprint[0] is meta:
            return self._fingerprint[1]
        identity = meta.get("identity") or {
            "kind": self.backend.kind.value,
            "model": await self.model_id(),
            "context": self.context,
        }
        value = system_fingerprint({"llmup": __version__, "backend": identity})
        if meta.get("identity"):  # else it is made of what may change (the model's id)
            self._fingerprint = (meta, value)
        return value

    async def aclose(self) -> None:
        await self.upstream.aclose()
        await self.grammar.aclose()

    def session_lock(self, owner: str, session_id: str) -> asyncio.Lock:
        """The lock that serializes one session's requests (alive while anyone holds it)."""
        key = (owner, session_id)
        lock = self._locks.get(key)
        if lock is None:
            lock = asyncio.Lock()
            self._locks[key] = lock
        return lock


def proxy_state(request: Request) -> ProxyState:
    return request.app.state.proxy
