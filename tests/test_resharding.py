"""Live re-sharding and rolling restarts without Ray: the supervisor's own code (Supervisor,
system/resharding.py) drives plain Shard, EventRouter and LiveBackend objects over real
PostgreSQL and NATS, while events stream in and slates are asked for. Every slate must be
answered by the user's shard (never from popularity), and verify must stay exact."""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import orjson
import psycopg
import pytest
import pytest_asyncio
from nats.js import JetStreamContext

import supervisor as supervisor_module
from actors.live_backend import LiveBackend, Serving
from actors.router import EventRouter
from actors.shard import Shard
from api.render import Rendered
from supervisor import Supervisor
from system import resharding
from system.bus import stream
from system.bus.dataplane import ShardClient
from system.bus.publisher import Publisher
from system.core.errors import Unavailable
from system.core.health import ROUTER
from system.core.popularity import Popularity
from system.core.settings import Settings
from system.db.catalog_store import CatalogStore
from system.db.pool import open_pool
from system.db.state_store import StateStore
from system.verify import verify
from tests.pipeline import LocalShards, prepare, restored, wait_for

pytestmark = pytest.mark.integration


class Api:
    """An API host, as the supervisor sees one: it takes health pushes (the slot map with them)."""

    def __init__(self, backend: LiveBackend) -> None:
        self.backend = backend

    async def ensure_serving(self) -> dict[str, Any]:
        return {"serving": True}

    async def set_health(self, snapshot: dict[str, Any]) -> None:
        self.backend.set_health(snapshot)

    async def set_popularity(self, *args: Any) -> None:
        return None

    async def reload_catalog(self) -> int:
        return 1

    async def stop(self) -> None:
        return None


class LocalFleet:
    """`system.core.health.Fleet` over plain objects in this process (Ray's part is transport)."""

    def __init__(self, settings: Settings, shards: dict[int, Shard], router: EventRouter, api: Api) -> None:
        self.settings, self.shards, self.router, self.api = settings, shards, router, api
        self.replaced: list[int] = []

    def target(self, actor: str) -> Any:
        if actor == ROUTER:
            return self.router
        kind, index = actor.rsplit("-", 1)
        return self.api if kind == "api" else self.shards[int(index)]

    async def call(self, actor: str, method: str, *args: Any, timeout: float) -> Any:
        result = getattr(self.target(actor), method)(*args)
        return await asyncio.wait_for(result, timeout) if inspect.isawaitable(result) else result

    def restart(self, actor: str) -> None:
        """A new process for the shard: the old one stops serving, a new one restores."""
        shard = int(actor.rsplit("-", 1)[1])
        old = self.shards[shard]
        asyncio.get_running_loop().create_task(old.stop())
        self.shards[shard] = Shard(shard, self.settings, seed=shard + 100)
        self.replaced.append(shard)

    def spawn_shard(self, shard: int) -> None:
        self.shards.setdefault(shard, Shard(shard, self.settings, seed=shard))

    def remove(self, actor: str) -> None:
        self.shards.pop(int(actor.rsplit("-", 1)[1]))


class Traffic:
    """Events for 400 users streaming onto NATS, and slates asked for them, until stopped."""

    def __init__(self, js: JetStreamContext, settings: Settings, backend: LiveBackend) -> None:
        self.js, self.settings, self.backend = js, settings, backend
        self.slates = 0
        self.failures: list[str] = []
        self.last_seq = 0
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._events()), asyncio.create_task(self._requests())]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def _events(self) -> None:
        rng = np.random.default_rng(4)
        i = 0
        while not self._stop.is_set():
            batch = [
                {"event_type": "clicked" if rng.random() < 0.2 else "seen", "entity_id": int(rng.integers(1, 41)),
                 "user_id": f"mover-{int(rng.integers(400))}", "event_id": f"m-{i + k}"}
                for k in range(20)
            ]  # fmt: skip
            i += 20
            ack = await self.js.publish(self.settings.events_subject, orjson.dumps(batch))
            self.last_seq = int(ack.seq)
            await asyncio.sleep(0.01)

    async def _requests(self) -> None:
        i = 0
        while not self._stop.is_set():
            uxid = f"mover-{i % 400}"
            try:
                ids, _ = await self.backend.slate(uxid, 5)
                assert len(ids) == 5
                self.slates += 1
            except Unavailable as exc:  # would have been a popularity slate: a failure here
                self.failures.append(f"{uxid}: {exc}")
            i += 1
            await asyncio.sleep(0.002)


@pytest_asyncio.fixture
async def fleet(settings: Settings, js: JetStreamContext) -> AsyncIterator[tuple[Supervisor, LocalFleet, Traffic]]:
    slot_map = await prepare(settings)
    pool = await open_pool(settings.database_url or "")
    catalog_store, state_store = CatalogStore(pool), StateStore(pool)
    shards = {i: Shard(i, settings, seed=i) for i in range(settings.shards)}
    for shard in shards.values():
        await restored(shard)
    holder: dict[int, Shard] = shards
    router = EventRouter(settings, LocalShards(holder))
    router.ensure_running()
    nc = await stream.connect(settings.nats_url or "", "test-api")
    publisher = Publisher(nc)
    publisher.start()
    serving = Serving.build(Rendered(await catalog_store.read()), Popularity.empty(), settings.policy())
    backend = LiveBackend(settings, serving, slot_map, ShardClient(nc, settings.namespace), publisher)
    actors = LocalFleet(settings, holder, router, Api(backend))
    supervisor = Supervisor(settings, actors, catalog_store, state_store, js, slot_map)
    await supervisor.step()
    traffic = Traffic(js, settings, backend)
    yield supervisor, actors, traffic
    await router.stop()
    for shard in actors.shards.values():
        await shard.stop()
    await publisher.drain()
    await nc.close()
    await pool.close()


async def settled_and_verified(supervisor: Supervisor, actors: LocalFleet, traffic: Traffic) -> None:
    """Every shard applied what was published, and verify finds each user's state exact."""
    last = traffic.last_seq
    await wait_for(lambda: all(s.state is not None and s.covered >= last for s in actors.shards.values()), 30)
    shards = dict(enumerate(sorted(actors.shards)))
    report = await verify(supervisor.settings, lambda s: actors.shards[shards[s]].export(), len(shards), 10)
    assert report.ok, report.as_dict()
    assert report.live.users > 0


async def test_two_to_three_to_one_shards_under_traffic(fleet: tuple[Supervisor, LocalFleet, Traffic]) -> None:
    supervisor, actors, traffic = fleet
    traffic.start()
    await wait_for(lambda: traffic.slates >= 20, 30)  # under way
    try:
        for wanted in (3, 1):
            before = traffic.slates
            await supervisor.state_store.set_desired_shards(wanted)
            await supervisor.reconcile()
            assert supervisor._changing is not None
            await supervisor._changing  # the change runs as its own task
            assert sorted(actors.shards) == list(range(wanted))
            per_shard = np.bincount(supervisor.slot_owners, minlength=wanted)
            assert len(per_shard) == wanted and per_shard.max() - per_shard.min() <= 1
            await wait_for(functools.partial(lambda b: traffic.slates >= b + 20, before), 30)  # on the new layout
    finally:
        await traffic.stop()
    assert not traffic.failures, traffic.failures[:5]
    assert supervisor.changes_done == 2
    await settled_and_verified(supervisor, actors, traffic)


async def test_a_rolling_restart_replaces_every_shard_under_traffic(
    fleet: tuple[Supervisor, LocalFleet, Traffic],
) -> None:
    supervisor, actors, traffic = fleet
    traffic.start()
    await wait_for(lambda: traffic.slates >= 20, 30)  # under way
    try:
        request = await supervisor.state_store.request_restart()
        await supervisor.reconcile()
        assert supervisor._changing is not None
        await supervisor._changing
        assert (await supervisor.state_store.deployment()).restart_done == request
    finally:
        await traffic.stop()
    assert actors.replaced == [0, 1]
    assert not traffic.failures, traffic.failures[:5]
    await settled_and_verified(supervisor, actors, traffic)


async def every_slot_served_once(supervisor: Supervisor, actors: LocalFleet) -> None:
    """Each slot is owned (taken, serving) by exactly one live shard, the one the map names."""
    layout = await supervisor.state_store.slot_map()

    def served() -> bool:
        owners: dict[int, list[int]] = {}
        for index, shard in actors.shards.items():
            if shard.state is not None and not shard.fenced:
                for slot in shard.epochs:
                    owners.setdefault(slot, []).append(index)
        return all(owners.get(slot) == [int(owner)] for slot, owner in enumerate(layout.owners))

    deadline = asyncio.get_running_loop().time() + 30
    while not served():  # the control loop's health checks go on meanwhile (a restarted shard restores)
        assert asyncio.get_running_loop().time() < deadline, "a slot is served by no shard, or by two"
        await supervisor.health.check()
        await asyncio.sleep(0.05)


async def until_done(supervisor: Supervisor, wanted: int) -> None:
    """Reconcile as the control loop does (once a second here: faster) until the change is done."""
    deadline = asyncio.get_running_loop().time() + 60
    while True:
        await supervisor.health.check()
        await supervisor.reconcile()
        if supervisor._changing is not None:
            await supervisor._changing
        layout = await supervisor.state_store.slot_map()
        if supervisor.failed is None and len(supervisor.health.shards) == wanted and layout.shards == wanted:
            return
        assert asyncio.get_running_loop().time() < deadline, supervisor.snapshot()["change_failed"]
        await asyncio.sleep(0.05)


async def test_a_release_that_times_out_keeps_the_old_layout_and_the_change_is_tried_again(
    fleet: tuple[Supervisor, LocalFleet, Traffic], monkeypatch: pytest.MonkeyPatch
) -> None:
    """2 -> 3 shards while PostgreSQL holds the sources' final checkpoints back (the checkpoint
    table locked by another session) until the release times out: the move is called off with
    the old layout whole (the sources restarted, so a release still running cannot land later),
    routing resumes, the failure and its reason show in the status, and the change is tried again
    until it is done; then every slot has one serving owner and verify is exact. (Before, the
    scale-up looked done once its new shard was watched, and was never tried again.)"""
    monkeypatch.setattr(resharding, "HANDOFF_TIMEOUT", 1.5)
    monkeypatch.setattr(supervisor_module, "CHANGE_RETRY", 0.2)
    supervisor, actors, traffic = fleet
    traffic.start()
    try:
        await wait_for(lambda: traffic.slates > 20)
        await supervisor.state_store.set_desired_shards(3)
        async with await psycopg.AsyncConnection.connect(supervisor.settings.database_url or "") as locker:
            async with locker.transaction():
                await locker.execute("LOCK TABLE user_state IN ACCESS EXCLUSIVE MODE")
                await supervisor.reconcile()
                assert supervisor._changing is not None
                await supervisor._changing
                failed = supervisor.snapshot()["change_failed"]
                assert failed and "could not release" in failed["why"] and failed["attempts"] == 1
                assert (await supervisor.state_store.slot_map()).shards == 2  # the old layout
                assert not (await supervisor.state_store.deployment()).routing_paused
                assert set(actors.replaced) == {0, 1}  # every source answered late, or not at all
        await until_done(supervisor, 3)
        await every_slot_served_once(supervisor, actors)
        before = traffic.slates
        await wait_for(lambda: traffic.slates > before + 20)  # served on the new layout
    finally:
        await traffic.stop()
    await settled_and_verified(supervisor, actors, traffic)


async def test_a_target_that_dies_mid_acquire_is_restarted_and_takes_its_slots(
    fleet: tuple[Supervisor, LocalFleet, Traffic], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The new shard of a 2 -> 3 re-shard dies while it takes its slots (the map already gives
    them to it): it is restarted, and its restore takes them; the change is done, every slot
    has one serving owner, and verify is exact."""
    supervisor, actors, traffic = fleet
    real = Shard.acquire
    died: list[int] = []

    async def dies(shard: Shard, slots: Any) -> int:
        if shard.shard_id == 2 and not died:
            died.append(shard.shard_id)
            await shard.stop()  # its process goes away mid-call
            raise RuntimeError("the actor died")
        return await real(shard, slots)

    monkeypatch.setattr(Shard, "acquire", dies)
    traffic.start()
    try:
        await wait_for(lambda: traffic.slates > 20)
        await supervisor.state_store.set_desired_shards(3)
        await until_done(supervisor, 3)
        assert died == [2] and 2 in actors.replaced
        await every_slot_served_once(supervisor, actors)
    finally:
        await traffic.stop()
    await settled_and_verified(supervisor, actors, traffic)


async def test_a_supervisor_that_dies_mid_move_leaves_a_move_its_successor_finishes(
    fleet: tuple[Supervisor, LocalFleet, Traffic], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A supervisor killed after its sources let their slots go and before the map changed (its
    last words never written: routing stays paused in PostgreSQL): the next supervisor finds the
    move interrupted, has every shard own exactly what the map gives it, resumes routing, and
    does the change; every slot has one serving owner and verify is exact."""
    supervisor, actors, traffic = fleet
    dying: asyncio.Task[None] | None = None
    released = asyncio.Event()
    real = Shard.release

    async def release_then_hang(shard: Shard, slots: Any) -> int:
        covered = await real(shard, slots)
        released.set()
        await asyncio.Event().wait()  # the supervisor dies while it waits for this answer
        return covered

    traffic.start()
    try:
        await wait_for(lambda: traffic.slates > 20)
        await supervisor.state_store.set_desired_shards(3)
        monkeypatch.setattr(Shard, "release", release_then_hang)
        await supervisor.reconcile()
        assert supervisor._changing is not None
        await asyncio.wait_for(released.wait(), 30)
        # Killed: nothing of it runs any more, not even its `finally` (routing stays paused).
        dying = supervisor._changing
        DEAD.clear()
        monkeypatch.setattr(StateStore, "pause_routing", _dead)
        dying.cancel()
        await wait_for(lambda: bool(DEAD))
        monkeypatch.undo()
        assert (await supervisor.state_store.deployment()).routing_paused
        successor = Supervisor(
            supervisor.settings, actors, supervisor.catalog_store, supervisor.state_store, supervisor.js,
            await supervisor.state_store.slot_map(),
        )  # fmt: skip
        successor.health.resize(len(actors.shards))
        await until_done(successor, 3)
        await every_slot_served_once(successor, actors)
        assert not (await successor.state_store.deployment()).routing_paused
    finally:
        await traffic.stop()
        if dying is not None:
            dying.cancel()  # (what is left of it: it never writes again)
    await settled_and_verified(successor, actors, traffic)


DEAD: list[bool] = []


async def _dead(*args: Any) -> None:
    """A process that is gone: whatever it was about to do never happens."""
    DEAD.append(True)
    await asyncio.Event().wait()
