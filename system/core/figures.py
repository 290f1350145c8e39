"""A shard's figures, said once: which key of `Shard.status()` each is, its kind and its help,
and its name in each of the two places they are exported (numpy-free, no I/O):
- the API's /metrics (api/metrics.py), read from the supervisor's last health snapshot;
- Ray's metrics export (actors/ray_metrics.py), recorded by each shard actor's wrapper, which
  Ray prefixes with `ray_`.
Both names are kept as they were (dashboards and alerts name them: deploy/)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class ShardFigure:
    key: str  # in Shard.status()
    kind: Literal["gauge", "counter"]
    help: str
    api: str | None  # its name on the API's /metrics (None: not there)
    ray: str | None  # its name in Ray's export, before Ray's prefix (None: not there)


USERS = ShardFigure(
    "users", "gauge", "Users held in the shard's memory", "mabrec_shard_users", "mabrec_shard_resident_users"
)
APPLIED = ShardFigure(
    "events_applied",
    "counter",
    "Events applied to the shard's users",
    "mabrec_shard_events_applied",
    "mabrec_shard_applied_events",
)
DUPLICATE = ShardFigure(
    "events_duplicate",
    "counter",
    "Events skipped as repeats of an event_id",
    "mabrec_shard_events_duplicate",
    "mabrec_shard_duplicate_events",
)
REPLAYED = ShardFigure(
    "replayed",
    "counter",
    "Events applied by replaying the stream (restores, gaps)",
    "mabrec_shard_events_replayed",
    "mabrec_shard_replayed_events",
)
SHARD_FIGURES = (
    ShardFigure("ready", "gauge", "1 if the shard is restored and serving", "mabrec_shard_ready", None),
    USERS,
    ShardFigure("covered_seq", "gauge", "Event stream sequence applied through", "mabrec_shard_covered_seq", None),
    ShardFigure(
        "checkpoint_seq", "gauge", "Event stream sequence checkpointed through", "mabrec_shard_checkpoint_seq", None
    ),
    ShardFigure("dirty_users", "gauge", "Users changed since the last checkpoint", "mabrec_shard_dirty_users", None),
    APPLIED,
    DUPLICATE,
    REPLAYED,
    ShardFigure("checkpoint_errors", "counter", "Failed checkpoints", "mabrec_shard_checkpoint_errors", None),
)
# `failures` in Shard.status(): "<stage>:<cause>" -> count, the same name in both places.
FAILURES = "mabrec_shard_failures"
FAILURES_HELP = "Failed applies and checkpoints of the shard, by cause (postgres, nats: outages; bug: not one)"
