"""Prometheus metrics: HTTP traffic (a pure ASGI middleware), the API's own counters, and the
system's status (shards, router, publisher) read at scrape time from the backend."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from system.core.events import LAG_EDGES
from system.core.figures import FAILURES, FAILURES_HELP, SHARD_FIGURES

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ApiMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.requests = Counter(
            "mabrec_http_requests", "HTTP requests", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "mabrec_http_request_seconds",
            "HTTP request latency",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.slates = Counter(
            "mabrec_recommendations",
            "Slates served, by source (shard or popularity fallback)",
            ["source"],
            registry=self.registry,
        )
        self.events = Counter(
            "mabrec_events_submitted",
            "Feedback events handed to the publisher, by type",
            ["type"],
            registry=self.registry,
        )
        self.events_dropped = Counter(
            "mabrec_events_dropped",
            "Events not recorded because the publish buffer was full",
            ["type"],
            registry=self.registry,
        )


class MetricsMiddleware:
    """Counts and times every request by its route template (not its raw path)."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            template = getattr(scope.get("route"), "path", "unmatched")
            key = (scope["method"], template, status)
            children = self._children.get(key)
            if children is None:  # label lookups cost more than the counting: do them once
                children = self._children[key] = (
                    self.metrics.requests.labels(scope["method"], template, str(status)),
                    self.metrics.latency.labels(template),
                )
            children[0].inc()
            children[1].observe(time.perf_counter() - began)


class StatusCollector(Collector):
    """Exports the backend's status dict (refreshed by the supervisor's health loop)."""

    def __init__(self, status: Callable[[], dict[str, Any]]) -> None:
        self.status = status

    def collect(self) -> Iterator[Metric]:
        status = self.status()
        shards = status.get("shards", [])
        for figure in SHARD_FIGURES:
            if figure.api is None:
                continue
            family: GaugeMetricFamily | CounterMetricFamily = (
                GaugeMetricFamily(figure.api, figure.help, labels=["shard"])
                if figure.kind == "gauge"
                else CounterMetricFamily(figure.api, figure.help, labels=["shard"])
            )
            for s in shards:
                family.add_metric([str(s["shard"])], float(s.get(figure.key) or 0))
            yield family
        failures = CounterMetricFamily(FAILURES, FAILURES_HELP, labels=["shard", "stage", "cause"])
        for s in shards:
            for key, count in sorted((s.get("failures") or {}).items()):
                stage, cause = key.split(":", 1)
                failures.add_metric([str(s["shard"]), stage, cause], float(count))
        yield failures
        lag = np.zeros(len(LAG_EDGES) + 1)
        lag_seconds = 0.0
        for s in shards:
            if s.get("lag_buckets"):
                lag += np.asarray(s["lag_buckets"])
                lag_seconds += float(s.get("lag_seconds") or 0.0)
        cumulative = np.cumsum(lag)
        yield HistogramMetricFamily(
            "mabrec_event_apply_lag_seconds",
            "From an event's ts (set by its publisher) to its application in a shard",
            buckets=[(f"{edge:.6g}", float(c)) for edge, c in zip(LAG_EDGES, cumulative[:-1], strict=True)]
            + [("+Inf", float(cumulative[-1]))],
            sum_value=lag_seconds,
        )
        router = status.get("router") or {}
        dead = CounterMetricFamily(
            "mabrec_events_dead_lettered", "Malformed events sent to the dead-letter subject", labels=["reason"]
        )
        for reason, count in (router.get("dead_letters") or {}).items():
            dead.add_metric([reason], float(count))
        yield dead
        yield CounterMetricFamily(
            "mabrec_router_events", "Events routed to shards", value=float(router.get("events") or 0)
        )
        yield GaugeMetricFamily(
            "mabrec_stream_last_seq",
            "Last sequence in the events stream",
            value=float(status.get("stream_last_seq") or 0),
        )
        publisher = status.get("publisher") or {}
        yield GaugeMetricFamily(
            "mabrec_publish_buffer",
            "Events waiting to be published to NATS",
            value=float(publisher.get("pending") or 0),
        )
