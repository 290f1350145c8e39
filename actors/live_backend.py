"""The API's live backend (api/backend.py): slates from the user's shard over NATS (or Ray while
NATS is down), a popularity fallback while that shard restarts, and events to the event log
through the publisher. The supervisor pushes it the shards' health and the global popularity."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import numpy as np

from api.render import Rendered
from system.bus.dataplane import ShardClient
from system.bus.publisher import Publisher, TooLarge
from system.core.errors import Moved, NotThisOne, PayloadTooLarge, Unavailable
from system.core.events import Event
from system.core.policy import Model, Picks, popular_slate
from system.core.policy_config import PolicyConfig
from system.core.popularity import Popularity
from system.core.profile import UserProfile
from system.core.settings import Settings
from system.core.sharding import SlotMap
from system.db.erasure_store import ErasureStore
from system.db.pool import short_lived_pool
from system.db.state_store import StateStore

# How long a shard that failed a call is skipped (fallback slates at once) before it is tried again.
SHARD_DOWN_SECONDS = 1.0
# How long a request waits for a slot a re-shard is moving (a move takes a fraction of that).
MOVE_WAIT = 5.0

T = TypeVar("T")


class Gateway(Protocol):
    """The API's way to a shard: NATS (system/bus/dataplane.py) or Ray (actors/ray_api.py)."""

    async def slate(self, shard: int, uxid: str, limit: int) -> Picks: ...

    async def profile(self, shard: int, uxid: str) -> UserProfile: ...

    async def erase(self, shard: int, uxid: str) -> dict[str, Any]: ...


class FailoverGateway:
    """Shards over NATS, the data plane; over Ray actor calls while NATS is down."""

    def __init__(self, nats: ShardClient, ray: Gateway) -> None:
        self.nats = nats
        self.ray = ray

    async def slate(self, shard: int, uxid: str, limit: int) -> Picks:
        if self.nats.connected:
            return await self.nats.slate(shard, uxid, limit)
        return await self.ray.slate(shard, uxid, limit)

    async def profile(self, shard: int, uxid: str) -> UserProfile:
        if self.nats.connected:
            return await self.nats.profile(shard, uxid)
        return await self.ray.profile(shard, uxid)

    async def erase(self, shard: int, uxid: str) -> dict[str, Any]:
        if self.nats.connected:
            return await self.nats.erase(shard, uxid)
        return await self.ray.erase(shard, uxid)


@dataclass(frozen=True)
class Serving:
    """What the API renders and ranks with: a catalog, rendered, and the policy's model of it
    under a global popularity. One object, swapped whole: a response never mixes two catalogs."""

    rendered: Rendered
    popularity: Popularity
    model: Model

    @classmethod
    def build(cls, rendered: Rendered, popularity: Popularity, policy: PolicyConfig) -> Serving:
        """Costly (the model): off the request path."""
        return cls(rendered, popularity, Model(rendered.catalog, policy, *popularity.dense(rendered.catalog)))


class LiveBackend:
    """The API's backend (see api/backend.py): shards through the gateway, NATS through the
    publisher. Used from the HTTP server's event loop only: its owner (actors/api_host.py) hands
    it every update (health, a catalog, popularity) on that loop."""

    def __init__(
        self, settings: Settings, serving: Serving, slot_map: SlotMap, gateway: Gateway, publisher: Publisher
    ) -> None:
        self.settings = settings
        self.serving = serving
        self.slot_map = slot_map
        self.gateway = gateway
        self.publisher = publisher
        self.rng = np.random.default_rng()
        self.health: dict[str, Any] = {"shards": [], "router": {}, "at": 0.0}
        self.down_until: dict[int, float] = {}
        self._owners: list[int] | None = None
        self.moved_retries = 0  # requests asked again because their slot was moving
        self.started = time.time()

    @property
    def catalog(self) -> Rendered:
        return self.serving.rendered

    def use(self, serving: Serving) -> None:
        """From now on, this catalog and model (built elsewhere, swapped here at once)."""
        self.serving = serving

    def set_health(self, snapshot: dict[str, Any]) -> None:
        self.health = {**snapshot, "at": time.time()}
        for shard in snapshot.get("shards", []):
            if shard.get("ready"):
                self.down_until.pop(shard["shard"], None)  # back: ask it again at once
            else:
                self.down_until[shard["shard"]] = time.monotonic() + SHARD_DOWN_SECONDS
        owners = snapshot.get("slot_owners")
        if owners is not None and owners != self._owners:  # a re-shard moved slots
            self._owners = owners
            self.slot_map = SlotMap(np.asarray(owners, dtype=np.int16))

    async def slate(self, uxid: str, limit: int) -> Picks:
        return await self._ask(uxid, lambda shard: self.gateway.slate(shard, uxid, limit))

    async def profile(self, uxid: str) -> UserProfile:
        return await self._ask(uxid, lambda shard: self.gateway.profile(shard, uxid))

    async def erase(self, uxid: str) -> dict[str, Any]:
        return await self._ask(uxid, lambda shard: self.gateway.erase(shard, uxid))

    async def erasures(self) -> list[dict[str, Any]]:
        async with short_lived_pool(self.settings.database_url or "", "api-erasures") as pool:
            return [e.as_dict() for e in await ErasureStore(pool).erasures()]

    async def _ask(self, uxid: str, call: Callable[[int], Awaitable[T]]) -> T:
        """Ask the user's shard. While a re-shard moves the user's slot, the shard that had it
        says so (Moved): wait a moment and ask again, by the slot map the supervisor pushes,
        rather than answer from popularity; for at most MOVE_WAIT seconds."""
        deadline, pause = time.monotonic() + MOVE_WAIT, 0.005
        while True:
            shard = self.slot_map.shard_of(uxid)
            if self.down_until.get(shard, 0.0) > time.monotonic():
                raise Unavailable(f"shard {shard} is down")  # answer from popularity at once
            try:
                return await call(shard)
            except NotThisOne:
                raise  # that request only: the shard serves the others
            except Moved:
                if time.monotonic() > deadline:
                    raise Unavailable(f"the slot of {uxid!r} was moving for over {MOVE_WAIT} s") from None
                self.moved_retries += 1
                await asyncio.sleep(pause)
                pause = min(pause * 2, 0.1)
            except Unavailable:
                self.down_until[shard] = time.monotonic() + SHARD_DOWN_SECONDS
                raise

    def fallback(self, limit: int) -> Picks:
        return popular_slate(self.serving.model, limit, self.rng)

    def publish(self, events: Sequence[Event]) -> bool:
        return self.publisher.submit_many(self.subject, [e.encode() for e in events])

    async def publish_durably(self, events: Sequence[Event], timeout: float) -> int:
        try:
            return await self.publisher.publish(self.subject, [e.encode() for e in events], timeout)
        except TooLarge as exc:  # one request is one message of the log: all of it, or none
            raise PayloadTooLarge(f"{exc}: send them in smaller batches") from None

    @property
    def subject(self) -> str:
        return f"{self.settings.events_subject}.api"

    async def set_desired_shards(self, shards: int) -> None:
        async with short_lived_pool(self.settings.database_url or "", "api-admin") as pool:
            await StateStore(pool).set_desired_shards(shards)

    def readiness(self) -> dict[str, Any]:
        shards = {str(s["shard"]): bool(s.get("ready")) for s in self.health.get("shards", [])}
        router = bool(self.health.get("router", {}).get("running"))
        catalog = len(self.catalog.catalog) > 0
        ready = bool(shards) and all(shards.values()) and router and catalog and self.publisher.connected
        return {
            "ready": ready,
            "catalog": catalog,
            "router": router,
            "nats": self.publisher.connected,
            "shards": shards,
        }

    def status(self) -> dict[str, Any]:
        return {
            "uptime": round(time.time() - self.started, 1),
            "namespace": self.settings.namespace,
            "catalog": {"version": self.catalog.catalog.version, "movies": len(self.catalog.catalog)},
            "shards": self.health.get("shards", []),
            "router": self.health.get("router", {}),
            "apis": self.health.get("apis", []),
            "supervisor_seen_seconds_ago": round(time.time() - self.health["at"], 1) if self.health["at"] else None,
            "publisher": self.publisher.status(),
            "moved_retries": self.moved_retries,
            "stream_last_seq": self.health.get("stream_last_seq", 0),
            "slot_owners": self.health.get("slot_owners"),
            "change": self.health.get("change"),
            "change_failed": self.health.get("change_failed"),
            "changes_done": self.health.get("changes_done", 0),
            "ray_dashboard": self.health.get("ray_dashboard"),
        }
