"""Prometheus metrics, one registry per app (so two apps in one process never share counts).

Gauges that mirror other objects (live sessions, backend restarts and state) are read at
scrape time rather than updated on every change: the store and the supervisor stay unaware
of metrics.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]


class Metrics:
    """Every metric the proxy exports, in its own CollectorRegistry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "llmup_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.latency = Histogram(
            "llmup_request_duration_seconds",
            "Time from request to the end of the response (whole stream included)",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "llmup_tokens",
            "Tokens in (prompt) and out (completion), by API (chat, completions, embeddings, "
            "responses, messages)",
            ["direction", "api"],
            registry=r,
        )
        self.ttft = Histogram(
            "llmup_time_to_first_token_seconds",
            "Time from request to the first streamed token, by API",
            ["api"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.context_drops = Counter(
            "llmup_context_drops", "Requests whose oldest turns were dropped to fit", registry=r
        )
        self.dropped_turns = Counter(
            "llmup_context_dropped_turns", "Turns dropped to fit the context window", registry=r
        )
        self.rejected = Counter(
            "llmup_queue_rejections", "Requests refused because the queue was full", registry=r
        )
        self.stream_errors = Counter(
            "llmup_stream_errors", "Streams ended by an error event", registry=r
        )
        self.sessions = Gauge("llmup_sessions", "Live (unexpired) sessions", registry=r)
        self.restarts = Gauge("llmup_backend_restarts", "Backend restarts so far", registry=r)
        self.backend_up = Gauge("llmup_backend_up", "1 when the backend is ready", registry=r)
        self.backend_state = Gauge(
            "llmup_backend_state", "1 for the backend's current state", ["state"], registry=r
        )
        self.health_failures = Gauge(
            "llmup_backend_failed_health_checks", "Backend health checks failed so far", registry=r
        )
        self.unhealthy_restarts = Gauge(
            "llmup_backend_unhealthy_restarts",
            "Backend restarts after failed health checks (hung or sick)",
            registry=r,
        )
        self.queue_depth = Gauge(
            "llmup_queue_depth", "Requests admitted and waiting for the backend", registry=r
        )
        self.slots = Gauge(
            "llmup_slots", "KV-cache sequences of a slot-keeping backend", ["state"], registry=r
        )
        self.slot_bytes = Gauge(
            "llmup_slot_saved_bytes", "Saved session states held, by store", ["store"], registry=r
        )
        self.slot_restores = Gauge(
            "llmup_slot_restores",
            "Session states restored since the backend started, by store",
            ["store"],
            registry=r,
        )
        self.slot_tokens = Gauge(
            "llmup_slot_prompt_tokens",
            "Prompt tokens since the backend started: reused from a session's KV or evaluated",
            ["kind"],
            registry=r,
        )
        self._refreshers: list[Callable[[], None]] = []

    def on_scrape(self, refresh: Callable[[], None]) -> None:
        """Run `refresh` before each scrape (to copy a value held elsewhere into a gauge)."""
        self._refreshers.append(refresh)

    def count_tokens(self, prompt: int | None, completion: int | None, api: str = "chat") -> None:
        if prompt:
            self.tokens.labels("in", api).inc(prompt)
        if completion:
            self.tokens.labels("out", api).inc(completion)

    def count_drop(self, turns: int) -> None:
        if turns > 0:
            self.context_drops.inc()
            self.dropped_turns.inc(turns)

    def set_slots(self, stats: dict) -> None:
        """Copy a slot-keeping backend's /slots figures into the gauges."""
        self.slots.labels("total").set(stats["slots"])
        self.slots.labels("in_use").set(stats["in_use"])
        self.slots.labels("pinned").set(stats["pinned"])
        self.slot_bytes.labels("ram").set(stats["ram_bytes"])
        self.slot_bytes.labels("disk").set(stats["disk_bytes"])
        for store, count in stats["restores"].items():
            self.slot_restores.labels(store).set(count)
        self.slot_tokens.labels("reused").set(stats["prefix_tokens_reused"])
        self.slot_tokens.labels("evaluated").set(stats["prompt_tokens_evaluated"])

    def render(self) -> bytes:
        for refresh in self._refreshers:
            refresh()
        return generate_latest(self.registry)
