"""Every Ray API call of mabrec lives here: init, actor options, spawn, lookup, calls, kill.

The shard and the router are plain classes; this module turns them into named, detached Ray
actors once, and exposes them to the rest of the system through small async facades that raise
`system.errors.Unavailable` (never a Ray exception), so the API and the control loop stay
Ray-agnostic and testable with fakes.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, RayActorError, RayError

from actors.router import EventRouter
from actors.shard import Shard
from system.batching import Batcher
from system.errors import Restarting, TimedOut, Unavailable
from system.events import Event
from system.logs import setup_logging
from system.policy import PolicyConfig
from system.settings import Settings
from system.sharding import SlotMap

log = logging.getLogger(__name__)

CALL_TIMEOUT = 5.0
RECOMMEND_TIMEOUT = 2.0


class ShardActor(Shard):
    def __init__(self, shard_id: int, settings: Settings, policy: PolicyConfig | None = None) -> None:
        setup_logging(settings.log_level, f"shard-{shard_id}")
        super().__init__(shard_id, settings, policy)

    def pid(self) -> int:
        return os.getpid()


class RouterActor(EventRouter):
    def __init__(self, settings: Settings) -> None:
        setup_logging(settings.log_level, "router")
        super().__init__(settings, ActorShardCalls(settings))

    def pid(self) -> int:
        return os.getpid()


# The one place where the plain classes become actors.
RemoteShard = ray.remote(ShardActor)
RemoteRouter = ray.remote(RouterActor)


def shard_name(settings: Settings, shard: int) -> str:
    return f"{settings.namespace}-shard-{shard}"


def router_name(settings: Settings) -> str:
    return f"{settings.namespace}-router"


def _options(name: str) -> dict[str, Any]:
    # Detached and named: a restarted supervisor re-attaches (get_if_exists) instead of creating
    # twins. Ray restarts a crashed actor (max_restarts=-1) with its constructor: state comes back
    # through ensure_ready. No task retries: a state-changing call must not run twice.
    return {
        "name": name,
        "lifetime": "detached",
        "get_if_exists": True,
        "max_restarts": -1,
        "max_task_retries": 0,
        "num_cpus": 0,
        "scheduling_strategy": "SPREAD",
    }


def connect(settings: Settings, address: str) -> str | None:
    """Join the Ray cluster at `address` as a driver in the system's namespace. Returns the
    cluster's dashboard URL, if it runs one."""
    context = ray.init(address=address, namespace=settings.namespace, logging_level="warning", log_to_driver=False)
    url = getattr(context, "dashboard_url", None)
    return f"http://{url}" if url and not url.startswith("http") else url or None


def disconnect() -> None:
    if ray.is_initialized():
        ray.shutdown()


async def _call(method: Any, *args: Any, timeout: float = CALL_TIMEOUT) -> Any:
    try:
        return await asyncio.wait_for(method.remote(*args), timeout)
    except Unavailable:
        raise
    except TimeoutError:
        raise TimedOut(f"{method} timed out after {timeout}s") from None
    except (RayActorError, ActorUnavailableError) as exc:
        raise Restarting(f"{method}: the actor is down or restarting: {type(exc).__name__}") from exc
    except RayError as exc:
        raise Unavailable(f"{method} failed: {type(exc).__name__}: {exc}") from exc


class ActorShardCalls:
    """`ShardCalls` for the router: shard actors looked up by name."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._handles: dict[int, Any] = {}

    def _handle(self, shard: int) -> Any:
        if shard not in self._handles:
            try:
                self._handles[shard] = ray.get_actor(
                    shard_name(self.settings, shard), namespace=self.settings.namespace
                )
            except ValueError:
                raise Unavailable(f"shard {shard} does not exist (yet)") from None
        return self._handles[shard]

    async def apply(self, shard: int, prev_seq: int, last_seq: int, events: Sequence[tuple[int, Event]]) -> int:
        return await _call(self._handle(shard).apply, prev_seq, last_seq, events, timeout=30.0)

    async def covered(self, shard: int) -> int | None:
        status = await _call(self._handle(shard).status)
        return status["covered_seq"] if status["ready"] else None


class Cluster:
    """The supervisor's handle on all actors: spawn or attach, call with timeouts, kill."""

    def __init__(self, settings: Settings, policy: PolicyConfig | None = None) -> None:
        self.settings = settings
        self.policy = policy
        self.shards: dict[int, Any] = {}
        self.router: Any = None

    def spawn(self, shards: int) -> None:
        for shard in range(shards):
            if shard not in self.shards:
                self.shards[shard] = RemoteShard.options(**_options(shard_name(self.settings, shard))).remote(
                    shard, self.settings, self.policy
                )
        if self.router is None:
            self.router = RemoteRouter.options(**_options(router_name(self.settings))).remote(self.settings)

    async def shard(self, shard: int, method: str, *args: Any, timeout: float = CALL_TIMEOUT) -> Any:
        return await _call(getattr(self.shards[shard], method), *args, timeout=timeout)

    async def route(self, method: str, *args: Any, timeout: float = CALL_TIMEOUT) -> Any:
        return await _call(getattr(self.router, method), *args, timeout=timeout)

    def restart_shard(self, shard: int) -> None:
        """Kill a hung shard; Ray restarts it (empty), and the next health check restores it."""
        ray.kill(self.shards[shard], no_restart=False)

    def restart_router(self) -> None:
        ray.kill(self.router, no_restart=False)

    def kill_all(self) -> None:
        """Remove the actors for good (after a graceful stop, which checkpointed them)."""
        for handle in [*self.shards.values(), self.router]:
            if handle is not None:
                try:
                    ray.kill(handle, no_restart=True)
                except RayError as exc:  # already gone
                    log.debug("kill failed", extra={"error": repr(exc)})
        self.shards, self.router = {}, None


class ShardGateway:
    """Recommendations for the API: each request goes to the shard owning its user, and
    concurrent requests to one shard share one actor call (see system/batching.py)."""

    def __init__(self, cluster: Cluster, slot_map: SlotMap) -> None:
        self.cluster = cluster
        self.slot_map = slot_map
        self.batchers = {
            shard: Batcher(lambda reqs, shard=shard: self._recommend(shard, reqs)) for shard in cluster.shards
        }

    async def recommend(self, uxid: str, limit: int) -> list[int]:
        return await self.batchers[self.slot_map.shard_of(uxid)].submit((uxid, limit))

    async def profile(self, uxid: str) -> list[list[int]]:
        return await self.cluster.shard(self.slot_map.shard_of(uxid), "user_counts", uxid)  # type: ignore[no-any-return]

    async def _recommend(self, shard: int, requests: Sequence[tuple[str, int]]) -> list[list[int]]:
        return await self.cluster.shard(shard, "recommend", list(requests), timeout=RECOMMEND_TIMEOUT)
