"""The proxy's side of a slot-keeping backend: forget a deleted session there too, and copy
its slot figures into /metrics. Both are best effort: a backend that is restarting loses
nothing the proxy needs (its saved states expire on their own)."""

from __future__ import annotations

import logging

from launcher.errors import ApiError
from launcher.protocol import backend_headers
from launcher.proxy.state import ProxyState

log = logging.getLogger(__name__)

SLOTS_PATH = "/slots"


async def forget_session(st: ProxyState, owner: str, session_id: str) -> None:
    """Drop the session's KV cache and saved state in the backend."""
    if not st.backend.kind.keeps_slots:
        return
    try:
        headers = backend_headers(owner, session_id)
        await st.upstream.call_json("DELETE", SLOTS_PATH, headers=headers)
    except ApiError as exc:
        log.warning("the backend could not forget session %s: %s", session_id, exc)


async def refresh_slot_metrics(st: ProxyState) -> None:
    if not st.backend.kind.keeps_slots or not st.ready:
        return
    try:
        st.metrics.set_slots(await st.upstream.call_json("GET", SLOTS_PATH) or {})
    except (ApiError, KeyError) as exc:
        log.warning("no slot figures from the backend: %s", exc)
