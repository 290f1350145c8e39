"""mabrec's own figures as Ray custom metrics (`ray.util.metrics`): what the shards, the event
router and the API actors are doing, in Ray's metrics export (each node's metrics export port,
Prometheus text), so Prometheus scrapes them with Ray's own and Grafana (and through it the Ray
dashboard) shows them.

The plain actor classes know nothing of this: the actor wrappers in actors/ray_api.py own one
exporter each. It reads the actor's `status()` every EXPORT_EVERY seconds (a background task,
started by the health check's call, whose death is logged) and records gauges as they read, and
counters by how much they grew since the last reading: a counter that went back (a shard restored
again, the API's HTTP server restarted, a new actor process) counts from zero again. The shard
also times each `slates` call into a histogram.

Ray exports every metric under its own namespace: `mabrec_shard_resident_users` is scraped as
`ray_mabrec_shard_resident_users`, a counter with a `_total` suffix, a histogram as
`_bucket`/`_count`/`_sum` (`Spec.exported`). The shard figures that the API's own /metrics also
reports (as the supervisor last saw them, api/metrics.py) are defined once, in
system/core/figures.py, with their name in each.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ray.util import metrics as ray_metrics

from system.core import figures
from system.core.figures import ShardFigure
from system.tasks import Background

# Seconds between two readings of an actor's status: Ray's agent exports every few seconds anyway.
EXPORT_EVERY = 2.0
# Ray's Prometheus namespace: every custom metric is exported with this prefix.
RAY_NAMESPACE = "ray_"
# Seconds: one `Shard.slates` call (a batch of slate requests).
SLATE_BOUNDARIES = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

Kind = Literal["gauge", "counter", "histogram"]


@dataclass(frozen=True)
class Spec:
    """One metric: its name as defined (Ray prefixes it on export), kind, help and tag keys."""

    name: str
    kind: Kind
    help: str
    tags: tuple[str, ...] = ()
    boundaries: tuple[float, ...] = ()

    @property
    def exported(self) -> tuple[str, ...]:
        """The sample names Prometheus sees."""
        base = RAY_NAMESPACE + self.name
        if self.kind == "counter":
            return (base + "_total",)
        if self.kind == "histogram":
            return (base + "_bucket", base + "_count", base + "_sum")
        return (base,)


def _spec(figure: ShardFigure) -> Spec:
    assert figure.ray is not None
    return Spec(figure.ray, figure.kind, figure.help, ("shard",))


RESIDENT_USERS, EVENTS_APPLIED, EVENTS_DUPLICATE, EVENTS_REPLAYED = map(
    _spec, (figures.USERS, figures.APPLIED, figures.DUPLICATE, figures.REPLAYED)
)
CHECKPOINT_LAG_EVENTS = Spec(
    "mabrec_shard_checkpoint_lag_events",
    "gauge",
    "Stream sequences applied but not yet checkpointed (covered_seq - checkpoint_seq)",
    ("shard",),
)
CHECKPOINT_LAG_SECONDS = Spec(
    "mabrec_shard_checkpoint_lag_seconds",
    "gauge",
    "Seconds since the last checkpoint while the shard holds changes not checkpointed (else 0)",
    ("shard",),
)
FAILURES = Spec(figures.FAILURES, "counter", figures.FAILURES_HELP, ("shard", "stage", "cause"))
SLATE_SECONDS = Spec(
    "mabrec_shard_slate_seconds",
    "histogram",
    "Time of one Shard.slates call (a batch of slate requests), in the shard",
    ("shard",),
    SLATE_BOUNDARIES,
)
FALLBACK_SLATES = Spec(
    "mabrec_api_fallback_slates",
    "counter",
    "Slates the API answered from global popularity (the user's shard was down or slow)",
    ("api",),
)
ROUTER_EVENTS = Spec("mabrec_router_routed_events", "counter", "Events the router sent to their shards")
ROUTER_DEAD_LETTERS = Spec(
    "mabrec_router_dead_letters", "counter", "Events the router dead-lettered, by reason", ("reason",)
)

SHARD_SPECS = (
    RESIDENT_USERS,
    EVENTS_APPLIED,
    EVENTS_DUPLICATE,
    EVENTS_REPLAYED,
    CHECKPOINT_LAG_EVENTS,
    CHECKPOINT_LAG_SECONDS,
    FAILURES,
    SLATE_SECONDS,
)
ROUTER_SPECS = (ROUTER_EVENTS, ROUTER_DEAD_LETTERS)
API_SPECS = (FALLBACK_SLATES,)
SPECS = SHARD_SPECS + ROUTER_SPECS + API_SPECS

# (metric, tags, value): one figure read from a status.
Reading = tuple[Spec, dict[str, str], float]


# --- what each actor's status says (pure: tested without Ray) ------------------------------------


def shard_readings(status: dict[str, Any], now: float, ready_since: float | None = None) -> list[Reading]:
    """A shard's `status()` as readings. The checkpoint lag in seconds counts from the last
    checkpoint (or, before the first, from `ready_since`) while anything is not checkpointed."""
    tags = {"shard": str(status["shard"])}
    ready = bool(status.get("ready"))
    lag_events = max(int(status["covered_seq"]) - int(status["checkpoint_seq"]), 0) if ready else 0
    pending = ready and (lag_events > 0 or int(status.get("dirty_users") or 0) > 0)
    since = status.get("last_checkpoint") or ready_since
    lag_seconds = max(now - since, 0.0) if pending and since is not None else 0.0
    failures: list[Reading] = []
    for key, count in sorted((status.get("failures") or {}).items()):
        stage, cause = key.split(":", 1)
        failures.append((FAILURES, {**tags, "stage": stage, "cause": cause}, float(count)))
    return failures + [
        *(
            (spec, tags, float(status.get(figure.key) or 0))
            for spec, figure in (
                (RESIDENT_USERS, figures.USERS),
                (EVENTS_APPLIED, figures.APPLIED),
                (EVENTS_DUPLICATE, figures.DUPLICATE),
                (EVENTS_REPLAYED, figures.REPLAYED),
            )
        ),
        (CHECKPOINT_LAG_EVENTS, tags, float(lag_events)),
        (CHECKPOINT_LAG_SECONDS, tags, lag_seconds),
    ]


def router_readings(status: dict[str, Any]) -> list[Reading]:
    readings: list[Reading] = [(ROUTER_EVENTS, {}, float(status.get("events") or 0))]
    for reason, count in sorted((status.get("dead_letters") or {}).items()):
        readings.append((ROUTER_DEAD_LETTERS, {"reason": str(reason)}, float(count)))
    return readings


def api_readings(status: dict[str, Any]) -> list[Reading]:
    return [(FALLBACK_SLATES, {"api": str(status["api"])}, float(status.get("fallback_slates") or 0))]


class Deltas:
    """How much each counter grew since it was last read. One that went back restarted from zero
    meanwhile (a new state, a new process): all of its value is new."""

    def __init__(self) -> None:
        self._last: dict[Hashable, float] = {}

    def step(self, key: Hashable, value: float) -> float:
        last = self._last.get(key, 0.0)
        self._last[key] = value
        return value - last if value >= last else value


# --- recording in Ray ----------------------------------------------------------------------------


class Exporter:
    """Reads `status()` every `every` seconds and records it in Ray's metrics. `ensure()` (called
    by the actor's health check, so from its event loop) starts the loop, and starts it again
    after it died (logged by system/tasks.py when it dies)."""

    def __init__(
        self,
        name: str,
        specs: Sequence[Spec],
        status: Callable[[], dict[str, Any]],
        readings: Callable[[dict[str, Any], float], list[Reading]],
        every: float = EXPORT_EVERY,
        make: Callable[[Spec], Any] | None = None,
    ) -> None:
        self.status = status
        self.readings = readings
        self.every = every
        self.deltas = Deltas()
        # Ray's metric objects (another `make` in tests): gauges `set`, counters `inc`, histograms `observe`.
        self._metrics: dict[str, Any] = {spec.name: (make or _make)(spec) for spec in specs}
        self._loop = Background(self._run, f"{name} metrics", forever=True)

    def ensure(self) -> None:
        self._loop.ensure()

    async def stop(self) -> None:
        await self._loop.cancel()

    async def _run(self) -> None:
        while True:
            self.export()
            await asyncio.sleep(self.every)

    def export(self) -> None:
        """Record one reading of the status."""
        for spec, tags, value in self.readings(self.status(), time.time()):
            metric = self._metrics[spec.name]
            if spec.kind == "gauge":
                metric.set(value, tags=tags)
            elif spec.kind == "counter":
                grew = self.deltas.step((spec.name, tuple(sorted(tags.items()))), value)
                if grew > 0:
                    metric.inc(grew, tags=tags)

    def observe(self, spec: Spec, value: float, tags: dict[str, str]) -> None:
        self._metrics[spec.name].observe(value, tags=tags)


def _make(spec: Spec) -> ray_metrics.Metric:
    if spec.kind == "gauge":
        return ray_metrics.Gauge(spec.name, spec.help, spec.tags)
    if spec.kind == "counter":
        return ray_metrics.Counter(spec.name, spec.help, spec.tags)
    return ray_metrics.Histogram(spec.name, spec.help, list(spec.boundaries), spec.tags)


class ShardMetrics(Exporter):
    def __init__(
        self,
        shard_id: int,
        status: Callable[[], dict[str, Any]],
        every: float = EXPORT_EVERY,
        make: Callable[[Spec], Any] | None = None,
    ) -> None:
        self.tags = {"shard": str(shard_id)}
        self.ready_since: float | None = None
        super().__init__(f"shard-{shard_id}", SHARD_SPECS, status, self._readings, every, make)

    def _readings(self, status: dict[str, Any], now: float) -> list[Reading]:
        if not status.get("ready"):
            self.ready_since = None
        elif self.ready_since is None:
            self.ready_since = now
        return shard_readings(status, now, self.ready_since)

    def slates_took(self, seconds: float) -> None:
        self.observe(SLATE_SECONDS, seconds, self.tags)


class RouterMetrics(Exporter):
    def __init__(self, status: Callable[[], dict[str, Any]], every: float = EXPORT_EVERY) -> None:
        super().__init__("router", ROUTER_SPECS, status, lambda status, now: router_readings(status), every)


class ApiMetricsExporter(Exporter):
    def __init__(self, index: int, status: Callable[[], dict[str, Any]], every: float = EXPORT_EVERY) -> None:
        super().__init__(f"api-{index}", API_SPECS, status, lambda status, now: api_readings(status), every)
