"""Every Ray API call of mabrec lives here: init, actor options, spawn, lookup, calls, kill.

The shards, the event router and the API host are plain classes; this module turns them into
named, detached Ray actors once, and exposes them to the rest of the system through small async
facades that raise `system.errors.Unavailable` (never a Ray exception), so the API, the router
and the control loop stay Ray-agnostic and testable with fakes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, RayActorError, RayError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.api_server import ApiServer
from actors.router import EventRouter
from actors.shard import Shard
from system.batching import Batcher
from system.errors import Restarting, TimedOut, Unavailable
from system.logs import setup_logging
from system.policy import Picks, PolicyConfig
from system.settings import Settings

log = logging.getLogger(__name__)

CALL_TIMEOUT = 5.0
RECOMMEND_TIMEOUT = 2.0
# Seconds a recommendation waits for others to the same shard before its actor call leaves
# (see system/batching.py): measured on 2 cores, it triples the request ceiling for +1 ms.
RECOMMEND_LINGER = 0.001
RECOMMEND_IN_FLIGHT = 2  # calls per shard at once: one computes while the next travels


class ShardActor(Shard):
    def __init__(self, shard_id: int, settings: Settings, policy: PolicyConfig | None = None) -> None:
        setup_logging(settings.log_level, f"shard-{shard_id}")
        super().__init__(shard_id, settings, policy)


class RouterActor(EventRouter):
    def __init__(self, settings: Settings) -> None:
        setup_logging(settings.log_level, "router")
        super().__init__(settings, ShardCalls(settings))


class ApiActor(ApiServer):
    def __init__(self, settings: Settings, index: int, port: int) -> None:
        setup_logging(settings.log_level, f"api-{index}")
        super().__init__(settings, index, port, ShardGateway(settings))


# The one place where the plain classes become actors.
RemoteShard = ray.remote(ShardActor)
RemoteRouter = ray.remote(RouterActor)
RemoteApi = ray.remote(ApiActor)


def shard_name(settings: Settings, shard: int) -> str:
    return f"{settings.namespace}-shard-{shard}"


def router_name(settings: Settings) -> str:
    return f"{settings.namespace}-router"


def api_name(settings: Settings, index: int) -> str:
    return f"{settings.namespace}-api-{index}"


def _options(name: str, **extra: Any) -> dict[str, Any]:
    # Detached and named: a restarted supervisor re-attaches (get_if_exists) instead of creating
    # twins, and the actors outlive a crashed supervisor. Ray restarts a crashed actor
    # (max_restarts=-1) with its constructor: state comes back through ensure_*. No task retries:
    # a state-changing call must not run twice.
    return {
        "name": name,
        "lifetime": "detached",
        "get_if_exists": True,
        "max_restarts": -1,
        "max_task_retries": 0,
        "num_cpus": 0,
        "scheduling_strategy": "SPREAD",
        **extra,
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


class Named:
    """Actors looked up by name (and cached): how actors reach each other."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._handles: dict[str, Any] = {}

    def handle(self, name: str) -> Any:
        if name not in self._handles:
            try:
                self._handles[name] = ray.get_actor(name, namespace=self.settings.namespace)
            except ValueError:
                raise Unavailable(f"actor {name} does not exist (yet)") from None
        return self._handles[name]

    async def call(self, name: str, method: str, *args: Any, timeout: float = CALL_TIMEOUT) -> Any:
        return await _call(getattr(self.handle(name), method), *args, timeout=timeout)


class ShardCalls(Named):
    """`actors.router.ShardCalls` over Ray."""

    async def covered(self, shard: int) -> int | None:
        status = await self.call(shard_name(self.settings, shard), "status")
        return status["covered_seq"] if status["ready"] else None


class ShardGateway(Named):
    """`actors.api_server.Gateway` over Ray actor calls: the API's way to the shards while NATS,
    the data plane, is down. Concurrent requests to one shard share one call (system/batching.py)."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self._batchers: dict[int, Batcher[tuple[str, int], Picks]] = {}

    async def recommend(self, shard: int, uxid: str, limit: int) -> Picks:
        batcher = self._batchers.get(shard)
        if batcher is None:
            batcher = self._batchers[shard] = Batcher(
                lambda reqs: self._recommend(shard, reqs), linger=RECOMMEND_LINGER, max_in_flight=RECOMMEND_IN_FLIGHT
            )
        return await batcher.submit((uxid, limit))

    async def _recommend(self, shard: int, requests: Sequence[tuple[str, int]]) -> list[Picks]:
        return await self.call(shard_name(self.settings, shard), "recommend", list(requests), timeout=RECOMMEND_TIMEOUT)  # type: ignore[no-any-return]

    async def profile(self, shard: int, uxid: str) -> list[list[int]]:
        return await self.call(shard_name(self.settings, shard), "user_counts", uxid)  # type: ignore[no-any-return]


class Cluster(Named):
    """The supervisor's handle on all actors: spawn or attach, call with timeouts, kill."""

    def __init__(self, settings: Settings, policy: PolicyConfig | None = None) -> None:
        super().__init__(settings)
        self.policy = policy
        self.shard_count = 0
        self.api_count = 0

    def spawn(self, shards: int, apis: int, port: int) -> None:
        """Create the actors that do not exist yet; attach to those that do."""
        for shard in range(shards):
            name = shard_name(self.settings, shard)
            self._handles[name] = RemoteShard.options(**_options(name)).remote(shard, self.settings, self.policy)
        name = router_name(self.settings)
        self._handles[name] = RemoteRouter.options(**_options(name)).remote(self.settings)
        # The API binds a port on this node: pin its actors here.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        for index in range(apis):
            name = api_name(self.settings, index)
            self._handles[name] = RemoteApi.options(**_options(name, scheduling_strategy=here)).remote(
                self.settings, index, port
            )
        self.shard_count, self.api_count = shards, apis

    async def shard(self, shard: int, method: str, *args: Any, timeout: float = CALL_TIMEOUT) -> Any:
        return await self.call(shard_name(self.settings, shard), method, *args, timeout=timeout)

    async def route(self, method: str, *args: Any, timeout: float = CALL_TIMEOUT) -> Any:
        return await self.call(router_name(self.settings), method, *args, timeout=timeout)

    async def api(self, index: int, method: str, *args: Any, timeout: float = CALL_TIMEOUT) -> Any:
        return await self.call(api_name(self.settings, index), method, *args, timeout=timeout)

    def restart_shard(self, shard: int) -> None:
        """Kill a hung shard; Ray restarts it (empty), and the next health check restores it."""
        ray.kill(self.handle(shard_name(self.settings, shard)), no_restart=False)

    def restart_router(self) -> None:
        ray.kill(self.handle(router_name(self.settings)), no_restart=False)

    def restart_api(self, index: int) -> None:
        ray.kill(self.handle(api_name(self.settings, index)), no_restart=False)

    def kill_all(self) -> None:
        """Remove the actors for good (after a graceful stop, which checkpointed them)."""
        for name, handle in self._handles.items():
            try:
                ray.kill(handle, no_restart=True)
            except RayError as exc:  # already gone
                log.debug("kill failed", extra={"actor": name, "error": repr(exc)})
        self._handles = {}
