"""A backend for the API with the real pieces and no services: one ShardState holds every user,
and what the API publishes is applied to it at once (what the router and the shards do over
NATS). The API's tests run on it in milliseconds."""

from __future__ import annotations

import time
from collections.abc import Sequence
from functools import cache
from typing import Any

import numpy as np

from api.render import Rendered
from system.core.catalog import Catalog
from system.core.errors import Unavailable
from system.core.events import Event
from system.core.policy import Picks, popular_slate
from system.core.profile import UserProfile
from system.core.shard_state import ShardState

# Rendering the shipped catalog takes ~60 ms: once per catalog, not once per test (it is immutable).
_rendered = cache(Rendered)


class FakeBackend:
    def __init__(self, catalog: Catalog, seed: int = 0) -> None:
        self._rendered = _rendered(catalog)
        self.state = ShardState(catalog, rng=np.random.default_rng(seed))
        self.published: list[Event] = []
        self.shard_down = False  # the user's shard is restarting
        self.nats_down = False  # the publish buffer is full / JetStream does not confirm
        self.desired_shards: int | None = None
        self.last_slates: dict[str, tuple[float, list[int], list[str]]] = {}
        self.erased: list[dict[str, Any]] = []

    @property
    def catalog(self) -> Rendered:
        return self._rendered

    async def slate(self, uxid: str, limit: int) -> Picks:
        if self.shard_down:
            raise Unavailable("shard 0 is not serving (restarting?)")
        ids, reasons = self.state.slate(uxid, limit)
        self.last_slates[uxid] = (time.time(), ids, reasons)
        return ids, reasons

    async def profile(self, uxid: str) -> UserProfile:
        return UserProfile(self.state.counts_of(uxid).tolist(), self.state.tastes(uxid), self.last_slates.get(uxid))

    async def erase(self, uxid: str) -> dict[str, Any]:
        in_memory = self.state.erase(uxid, None)  # nothing is checkpointed here
        self.last_slates.pop(uxid, None)
        erasure = {"erasure": len(self.erased) + 1, "through_seq": len(self.published), "in_memory": in_memory}
        self.erased.append(erasure)
        return erasure

    async def erasures(self) -> list[dict[str, Any]]:
        return self.erased[::-1]

    def fallback(self, limit: int) -> Picks:
        return popular_slate(self.state.model, limit, np.random.default_rng(1))

    def publish(self, events: Sequence[Event]) -> bool:
        if self.nats_down:
            return False
        self.published.extend(events)
        self.state.apply(events)
        return True

    async def publish_durably(self, events: Sequence[Event], timeout: float) -> int:
        if self.nats_down:
            raise Unavailable("the event buffer is full (NATS is unreachable); retry later")
        self.publish(events)
        return len(self.published)  # as if each event were a message of the stream

    async def set_desired_shards(self, shards: int) -> None:
        self.desired_shards = shards

    def readiness(self) -> dict[str, Any]:
        return {"ready": not self.shard_down, "shards": {"0": not self.shard_down}}

    def status(self) -> dict[str, Any]:
        return {"shards": [{"shard": 0, "ready": not self.shard_down, "users": len(self.state.users)}]}
