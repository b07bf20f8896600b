"""Requests that were at the backend when it crashed are not sent to it again.

Validation catches the inputs known to kill llama.cpp; this catches the ones nobody knows
yet. Every forwarded request is registered while it is at the backend (by a digest of the
route and the exact body sent), and when the backend drops connections (a crash: the
process is gone, not a timeout or a refused connection) every request then in flight is
remembered. The same request sent again (a retry by hand, or the openai client's own) is
a 400 instead of another crash, so no client can use up the supervisor's restart budget
by repeating a request. A request that was only a bystander is refused too if resent
unchanged; any change (a `seed`, one more word) makes it a new request.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from launcher.errors import BadRequestError

log = logging.getLogger(__name__)

REMEMBERED = 4096


def request_digest(route: str, payload: dict[str, Any]) -> str:
    text = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(f"{route}\n{text}".encode()).hexdigest()


class CrashMemory:
    """In-flight requests by digest, and the digests of those a crash interrupted."""

    def __init__(self, size: int = REMEMBERED) -> None:
        self.size = size
        self._inflight: dict[int, str] = {}
        self._crashed: OrderedDict[str, None] = OrderedDict()
        self._next = 0

    def refuse_known(self, digest: str) -> None:
        """400 for a request that was at the backend when it crashed."""
        if digest in self._crashed:
            raise BadRequestError(
                "this exact request was being processed when the model backend crashed, so "
                "it is not sent again; change it (for example its `seed` or its text) to retry",
                code="request_crashed_backend",
            )

    @contextmanager
    def inflight(self, digest: str) -> Iterator[None]:
        """Register a request for as long as the backend works on it."""
        self._next += 1
        ticket = self._next
        self._inflight[ticket] = digest
        try:
            yield
        finally:
            self._inflight.pop(ticket, None)

    def backend_crashed(self) -> None:
        """Remember every request in flight now (the backend dropped their connections)."""
        for digest in self._inflight.values():
            self._crashed[digest] = None
            self._crashed.move_to_end(digest)
        while len(self._crashed) > self.size:
            self._crashed.popitem(last=False)
        if self._inflight:
            log.warning("backend crashed with %d request(s) in flight", len(self._inflight))

    def __len__(self) -> int:
        return len(self._crashed)
