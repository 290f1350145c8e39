"""Every Ray API call of mabrec lives here: init, actor options, spawn, lookup, calls, kill (and,
in actors/ray_metrics.py, which only the actor wrappers below use, its Ray metrics).

The shards, the event router and the API host are plain classes; this module turns them into
named, detached Ray actors once, and exposes them to the rest of the system through small async
facades that raise `system.core.errors.Unavailable` (never a Ray exception), so the API, the
router and the control loop stay Ray-agnostic and testable with fakes.

Actors are known by a key: "shard-<i>", "router", "api-<i>" (system/core/health.py); their Ray
name is the key prefixed with the namespace.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, RayActorError, RayError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.api_host import ApiHost
from actors.ray_metrics import ApiMetricsExporter, RouterMetrics, ShardMetrics
from actors.router import EventRouter
from actors.shard import Answer, Shard
from system.batching import Batchers
from system.bus.dataplane import owned, picked
from system.core.errors import Restarting, TimedOut, Unavailable
from system.core.health import ROUTER, api_key, shard_key
from system.core.policy import Picks
from system.core.policy_config import PolicyConfig
from system.core.profile import UserProfile
from system.core.settings import Settings
from system.logs import setup_logging

log = logging.getLogger(__name__)

CALL_TIMEOUT = 5.0
SLATE_TIMEOUT = 2.0
# Seconds a slate request waits for others to the same shard before its actor call leaves
# (system/batching.py): a millisecond buys much larger batches under load.
SLATE_LINGER = 0.001
SLATE_IN_FLIGHT = 2  # calls per shard at once: one computes while the next travels


# The actors export their figures as Ray metrics (actors/ray_metrics.py): each starts its
# exporter on the health check's call (from the actor's event loop), which also restarts it if it
# died. The plain classes stay Ray-free.


class ShardActor(Shard):
    def __init__(self, shard_id: int, settings: Settings, policy: PolicyConfig | None = None) -> None:
        setup_logging(settings.log_level, shard_key(shard_id))
        super().__init__(shard_id, settings, policy)
        self.exporter = ShardMetrics(shard_id, self.status)

    async def ensure_ready(self) -> dict[str, Any]:
        self.exporter.ensure()
        return await super().ensure_ready()

    async def slates(self, requests: Sequence[tuple[str, int]]) -> list[Answer]:
        """`Shard.slates`, timed (over NATS and over Ray alike: the data plane calls it too)."""
        began = time.perf_counter()
        picks = await super().slates(requests)
        self.exporter.slates_took(time.perf_counter() - began)
        return picks


class RouterActor(EventRouter):
    def __init__(self, settings: Settings) -> None:
        setup_logging(settings.log_level, ROUTER)
        super().__init__(settings, ShardPositions(settings))
        self.exporter = RouterMetrics(self.status)

    def ensure_running(self) -> dict[str, Any]:
        # A sync method of an async actor runs on the actor's event loop: the exporter's task can start.
        self.exporter.ensure()
        return super().ensure_running()


class ApiActor(ApiHost):
    def __init__(self, settings: Settings, index: int, port: int) -> None:
        setup_logging(settings.log_level, api_key(index))
        super().__init__(settings, index, port, RayShardClient(settings))
        self.exporter = ApiMetricsExporter(index, self.status)

    async def ensure_serving(self) -> dict[str, Any]:
        self.exporter.ensure()
        return await super().ensure_serving()


# The one place where the plain classes become actors.
RemoteShard = ray.remote(ShardActor)
RemoteRouter = ray.remote(RouterActor)
RemoteApi = ray.remote(ApiActor)


def actor_name(settings: Settings, key: str) -> str:
    return f"{settings.namespace}-{key}"


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


def connect(settings: Settings, address: str, actor_logs: bool = False) -> str | None:
    """Join the Ray cluster at `address` as a driver in the system's namespace. Returns the
    cluster's dashboard URL, if it runs one. With `actor_logs`, the log lines of the actors this
    driver creates (their stderr: tracebacks too) are printed on this process's stderr, each
    prefixed by Ray with the actor's repr (the supervisor's one log stream)."""
    context = ray.init(
        address=address, namespace=settings.namespace, logging_level=logging.WARNING, log_to_driver=actor_logs
    )
    url = getattr(context, "dashboard_url", None)
    return f"http://{url}" if url and not url.startswith("http") else url or None


def metrics_url() -> str | None:
    """Ray's metrics export of this process's node (Prometheus text: Ray's figures and mabrec's,
    actors/ray_metrics.py), as the cluster lists it; None if the node exports none."""
    here = ray.get_runtime_context().get_node_id()
    nodes: list[dict[str, Any]] = ray.nodes()  # type: ignore[no-untyped-call]
    for node in nodes:
        port = node.get("MetricsExportPort")
        if node["NodeID"] == here and port and int(port) > 0:
            return f"http://{node['NodeManagerAddress']}:{port}"
    return None


@ray.remote(num_cpus=0, max_retries=0)
def _on_node() -> str:
    return str(ray.get_runtime_context().get_node_id())


async def wait_for_nodes(count: int, timeout: float) -> int:
    """Wait (bounded) until the cluster has `count` live nodes that can run work: actors are
    placed over the nodes there when they are created, and stay. Returns how many there are.

    A node is alive in the GCS a moment before the scheduler here hears of it: actors placed in
    that moment would all land on the nodes it knew. A task pinned to each node runs only once the
    scheduler knows it."""
    deadline = time.monotonic() + timeout
    while True:
        alive = _alive_nodes()
        # One node: the scheduler here knows its own.
        if len(alive) >= count and (count <= 1 or await _each_runs_a_task(alive, deadline)):
            return len(alive)
        if time.monotonic() > deadline:
            log.warning("fewer usable Ray nodes than asked for: placing the actors anyway", extra={"nodes": len(alive)})
            return len(alive)
        log.info("waiting for Ray nodes", extra={"nodes": len(alive), "wanted": count})
        await asyncio.sleep(1.0)


async def _each_runs_a_task(nodes: list[str], deadline: float) -> bool:
    pinned = [_on_node.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)) for n in nodes]
    try:
        await asyncio.wait_for(asyncio.gather(*(task.remote() for task in pinned)), max(deadline - time.monotonic(), 1))
    except (TimeoutError, RayError) as exc:  # a node died meanwhile, or never became usable
        log.warning("a Ray node did not run a task", extra={"error": repr(exc)})
        return False
    return True


def _alive_nodes() -> list[str]:
    """The live nodes' ids: this process's node first, then the others in id order."""
    here = ray.get_runtime_context().get_node_id()
    nodes: list[dict[str, Any]] = ray.nodes()  # type: ignore[no-untyped-call]
    alive = sorted(node["NodeID"] for node in nodes if node.get("Alive") and node["NodeID"] != here)
    return [here, *alive]


def cluster_cpus() -> float:
    """The CPUs of the live nodes of the cluster, as Ray counts them."""
    resources: dict[str, float] = ray.cluster_resources()  # type: ignore[no-untyped-call]
    return float(resources.get("CPU", 1.0))


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


class Actors:
    """Actors looked up by key (and cached): how actors and the supervisor reach each other."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._handles: dict[str, Any] = {}

    def handle(self, key: str) -> Any:
        if key not in self._handles:
            try:
                self._handles[key] = ray.get_actor(actor_name(self.settings, key), namespace=self.settings.namespace)
            except ValueError:
                raise Unavailable(f"actor {key} does not exist (yet)") from None
        return self._handles[key]

    async def call(self, actor: str, method: str, *args: Any, timeout: float = CALL_TIMEOUT) -> Any:
        return await _call(getattr(self.handle(actor), method), *args, timeout=timeout)

    def exists(self, key: str) -> bool:
        try:
            self.handle(key)
        except Unavailable:
            return False
        return True


class ShardPositions(Actors):
    """`actors.router.ShardPositions` over Ray."""

    async def covered(self, shard: int) -> int | None:
        status = await self.call(shard_key(shard), "status")
        return status["covered_seq"] if status["ready"] else None


class RayShardClient(Actors):
    """`actors.live_backend.Gateway` over Ray actor calls: the API's way to the shards while NATS,
    the data plane, is down. Concurrent requests to one shard share one call (system/batching.py)."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.batchers: Batchers[int, tuple[str, int], Answer] = Batchers(
            self._slates, linger=SLATE_LINGER, max_in_flight=SLATE_IN_FLIGHT
        )

    async def slate(self, shard: int, uxid: str, limit: int) -> Picks:
        return picked(await self.batchers.submit(shard, (uxid, limit)), shard, uxid)

    async def _slates(self, shard: int, requests: Sequence[tuple[str, int]]) -> list[Answer]:
        answers: list[Answer] = await self.call(shard_key(shard), "slates", list(requests), timeout=SLATE_TIMEOUT)
        return answers

    async def profile(self, shard: int, uxid: str) -> UserProfile:
        return UserProfile.from_wire(owned(await self.call(shard_key(shard), "user_counts", uxid), shard, uxid))

    async def erase(self, shard: int, uxid: str) -> dict[str, Any]:
        erased: dict[str, Any] = owned(await self.call(shard_key(shard), "erase", uxid), shard, uxid)
        return erased


class Cluster(Actors):
    """The supervisor's handle on all actors (`system.core.health.Actors`): spawn or attach,
    call with timeouts, restart, remove."""

    def __init__(self, settings: Settings, policy: PolicyConfig | None = None) -> None:
        super().__init__(settings)
        self.policy = policy

    def spawn(self, shards: int, apis: int, port: int) -> None:
        """Create the actors that do not exist yet; attach to those that do."""
        for shard in range(shards):
            self.spawn_shard(shard)
        self._handles[ROUTER] = RemoteRouter.options(**_options(actor_name(self.settings, ROUTER))).remote(
            self.settings
        )
        # The API binds a port on this node: pin its actors here.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        for index in range(apis):
            key = api_key(index)
            options = _options(actor_name(self.settings, key), scheduling_strategy=here)
            self._handles[key] = RemoteApi.options(**options).remote(self.settings, index, port)

    def spawn_shard(self, shard: int) -> None:
        """Create shard `shard`'s actor (or attach to it): it restores the slots the map gives it.
        Over several nodes, shard i goes to the i-th (this one first), softly: a node that is gone
        when the actor (re)starts is passed over. SPREAD alone put every shard on one node at times."""
        key = shard_key(shard)
        nodes = _alive_nodes()
        extra: dict[str, Any] = {}
        if len(nodes) > 1:
            extra["scheduling_strategy"] = NodeAffinitySchedulingStrategy(nodes[shard % len(nodes)], soft=True)
        options = _options(actor_name(self.settings, key), **extra)
        self._handles[key] = RemoteShard.options(**options).remote(shard, self.settings, self.policy)

    def restart(self, actor: str) -> None:
        """Kill a hung actor (or one to replace); Ray restarts it (empty), and the next health
        check restores it."""
        ray.kill(self.handle(actor), no_restart=False)

    def remove(self, actor: str) -> None:
        """Remove an actor for good (a shard a re-shard retired, after its final checkpoint)."""
        handle = self._handles.pop(actor, None) or self.handle(actor)
        self._handles.pop(actor, None)
        ray.kill(handle, no_restart=True)

    def kill_all(self) -> None:
        """Remove the actors for good (after a graceful stop, which checkpointed them)."""
        for key, handle in self._handles.items():
            try:
                ray.kill(handle, no_restart=True)
            except RayError as exc:  # already gone
                log.info("kill failed", extra={"actor": key, "error": repr(exc)})
        self._handles = {}
