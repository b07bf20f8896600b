"""Requests that crashed the backend are not sent to it again.

Validation catches the inputs known to kill llama.cpp; this catches the ones nobody knows
yet. Every forwarded request is registered while it is at the backend (a `Ticket`: its
owner and a digest of the route and the exact body sent). When the backend drops the
connections of requests in flight (a crash: the process is gone, not a timeout or a refused
connection), that crash is counted once, and a request is held responsible only when the
evidence points at it:

- it was the only request in flight (several copies of one request count as one), or
- it was in flight at two different crashes;

and never when the supervisor itself stopped the backend (an unhealthy kill, a shutdown):
then the requests were victims, not causes. A request held responsible is refused (400
`request_crashed_backend`) when its owner sends it again unchanged, by hand or by the
openai client's automatic retries, so no client can use up the supervisor's restart budget
by repeating it; any change (a `seed`, one more word) makes it a new request. Another key
sending the same body is not refused: what one key did is never held against another.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import orjson

from launcher.errors import BadRequestError

log = logging.getLogger(__name__)

REMEMBERED = 4096

Key = tuple[str, str]  # (owner, request digest)


def request_digest(route: str, payload: dict[str, Any]) -> str:
    """What names one request to the crash memory (kept in memory only, so orjson's
    bytes, or Python's json's for an integer past 64 bits, need match nothing else)."""
    try:
        text = orjson.dumps(payload, option=orjson.OPT_SORT_KEYS)
    except TypeError:
        text = json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()
    return hashlib.sha256(route.encode() + b"\n" + text).hexdigest()


@dataclass(eq=False)
class Ticket:
    """One request at the backend: whose, which, how many times the supervisor had stopped
    the backend when it was sent, and the crash it was caught in (0: none yet)."""

    key: Key
    ordered_stops: int
    crash: int = 0


class CrashMemory:
    """In-flight requests, and the requests held responsible for a crash.

    `ordered_stops` returns how many times the supervisor has stopped the backend on
    purpose (unhealthy kills and stops); a crash during which it changed was one of those.
    """

    def __init__(
        self, size: int = REMEMBERED, *, ordered_stops: Callable[[], int] = lambda: 0
    ) -> None:
        self.size = size
        self.ordered_stops = ordered_stops
        self._inflight: set[Ticket] = set()
        self._crashed: OrderedDict[Key, None] = OrderedDict()
        self._suspects: OrderedDict[Key, int] = OrderedDict()  # -> the crash it was in
        self._crashes = 0

    def refuse_known(self, owner: str, digest: str) -> None:
        """400 for a request of this owner that crashed the backend before."""
        if (owner, digest) in self._crashed:
            raise BadRequestError(
                "this exact request crashed the model backend before, so it is not sent "
                "again; change it (for example its `seed` or its text) to retry",
                code="request_crashed_backend",
            )

    @contextmanager
    def inflight(self, owner: str, digest: str) -> Iterator[Ticket]:
        """Register a request for as long as the backend works on it."""
        ticket = Ticket((owner, digest), self.ordered_stops())
        self._inflight.add(ticket)
        try:
            yield ticket
        finally:
            self._inflight.discard(ticket)

    def backend_dropped(self, ticket: Ticket) -> None:
        """The backend dropped this request's connection: count the crash (once, whichever
        of its requests reports it first) and hold a request responsible if the evidence
        allows (see the module's doc)."""
        if ticket.crash:
            return  # this crash is counted already
        caught = [t for t in self._inflight | {ticket} if not t.crash]
        self._crashes += 1
        for t in caught:
            t.crash = self._crashes
        if any(t.ordered_stops != self.ordered_stops() for t in caught):
            log.info("the backend was stopped by the supervisor with %d request(s) in flight; "
                     "none is held responsible", len(caught))  # fmt: skip
            return
        keys = {t.key for t in caught}
        log.warning("backend crashed with %d request(s) in flight", len(caught))
        if len(keys) == 1:
            self._remember(*keys)
            return
        for key in keys:
            if self._suspects.get(key, self._crashes) != self._crashes:
                self._remember(key)  # in flight at an earlier crash too
            else:
                self._suspect(key)

    def _remember(self, key: Key) -> None:
        self._suspects.pop(key, None)
        self._crashed[key] = None
        self._crashed.move_to_end(key)
        while len(self._crashed) > self.size:
            self._crashed.popitem(last=False)

    def _suspect(self, key: Key) -> None:
        self._suspects[key] = self._crashes
        self._suspects.move_to_end(key)
        while len(self._suspects) > self.size:
            self._suspects.popitem(last=False)

    def __len__(self) -> int:
        return len(self._crashed)
