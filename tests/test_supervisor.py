"""The control loop, one step at a time, against fakes of the actors, the catalog and the stream."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

import supervisor as supervisor_module
from supervisor import Supervisor
from system.core.popularity import Popularity
from system.core.settings import Settings
from system.core.sharding import SlotMap
from system.db.state_store import Deployment


class FakeActors:
    """Shards, a router and API hosts that answer every call and remember what they were told."""

    def __init__(self, shards: int) -> None:
        self.calls: list[tuple[str, str]] = []
        self.told: dict[str, tuple[Any, ...]] = {}
        self.broken: set[str] = set()  # methods that raise

    async def call(self, actor: str, method: str, *args: Any, timeout: float) -> Any:
        self.calls.append((actor, method))
        if method in self.broken:
            raise RuntimeError(f"{method} is broken")
        if method in ("ensure_ready", "ensure_running", "ensure_serving"):
            return {"ready": True, "running": True, "serving": True}
        self.told[f"{actor}.{method}"] = args
        return None

    def restart(self, actor: str) -> None:
        raise AssertionError("nothing here hangs")


class FakeCatalog:
    def __init__(self) -> None:
        self.current = 1

    async def version(self) -> int:
        return self.current


class FakeStates:
    oldest = 0

    async def popularity(self) -> Popularity:
        return Popularity(np.array([-1, 7]), np.array([3, 1]), np.array([20, 9]))

    async def oldest_checkpoint(self) -> int:
        return self.oldest

    async def deployment(self) -> Deployment:
        return Deployment(2, 0, 0, False, 0)  # as it is: nothing to change

    async def slot_map(self) -> SlotMap:
        return SlotMap.even(2)


class FakeStream:
    first_seq = 1

    async def stream_info(self, name: str) -> Any:
        return SimpleNamespace(state=SimpleNamespace(last_seq=42, first_seq=self.first_seq, messages=42))


@pytest.fixture
def parts() -> tuple[Supervisor, FakeActors, FakeCatalog]:
    actors, catalog = FakeActors(2), FakeCatalog()
    settings = Settings(shards=2, api_workers=1)
    # Fakes of the catalog store and the stream: duck-typed, what the supervisor calls of them.
    slot_map = SlotMap.even(2)
    supervisor = Supervisor(settings, actors, catalog, FakeStates(), FakeStream(), slot_map, ray_dashboard=None)  # type: ignore[arg-type]
    return supervisor, actors, catalog


async def test_a_step_checks_health_and_tells_the_api(parts: tuple[Supervisor, FakeActors, FakeCatalog]) -> None:
    supervisor, actors, _ = parts
    await supervisor.step()
    assert supervisor.health.all_up and supervisor.stream_last_seq == 42
    [snapshot] = actors.told["api-0.set_health"]
    assert snapshot["stream_last_seq"] == 42 and len(snapshot["shards"]) == 2 and snapshot["router"]["running"]
    assert snapshot["control_loop"]["steps"] == 0 and supervisor.steps == 1


async def test_an_actor_that_is_down_is_left_to_the_health_check(
    parts: tuple[Supervisor, FakeActors, FakeCatalog],
) -> None:
    """A hung shard must not stall the rest of the step: after its failed health check, the
    step's other calls skip it (and a new catalog is told again once it is back)."""
    supervisor, actors, _ = parts
    actors.broken = {"ensure_ready"}
    await supervisor.step()
    assert not supervisor.health.all_up
    assert {a for a, m in actors.calls if m not in ("ensure_ready", "ensure_running", "ensure_serving")} == {
        "router",
        "api-0",
    }
    assert supervisor.told_version is None  # the shards have not heard of the catalog yet
    actors.broken = set()
    await supervisor.health.check()
    await supervisor.watch_catalog()
    assert supervisor.told_version == 1


async def test_popularity_from_the_checkpoints_is_sent_to_every_actor(
    parts: tuple[Supervisor, FakeActors, FakeCatalog],
) -> None:
    supervisor, actors, _ = parts
    await supervisor.step()
    for actor in ("shard-0", "shard-1", "api-0"):
        keys, clicks, seen = actors.told[f"{actor}.set_popularity"]
        assert (keys.tolist(), clicks.tolist(), seen.tolist()) == ([-1, 7], [3, 1], [20, 9])


async def test_a_new_catalog_is_told_to_every_actor_once(parts: tuple[Supervisor, FakeActors, FakeCatalog]) -> None:
    supervisor, actors, catalog = parts
    await supervisor.step()
    assert {a for a, m in actors.calls if m in ("reload_catalog", "reload")} == {
        "shard-0",
        "shard-1",
        "router",
        "api-0",
    }
    actors.calls.clear()
    await supervisor.watch_catalog()
    assert not [c for c in actors.calls if c[1] in ("reload_catalog", "reload")]  # same version: nothing
    catalog.current = 2
    await supervisor.watch_catalog()
    assert len([c for c in actors.calls if c[1] in ("reload_catalog", "reload")]) == 4


async def test_a_failing_substep_is_logged_by_name_and_the_others_still_run(
    parts: tuple[Supervisor, FakeActors, FakeCatalog], caplog: pytest.LogCaptureFixture
) -> None:
    supervisor, actors, _ = parts
    actors.broken = {"set_health", "set_popularity"}
    with caplog.at_level(logging.WARNING):
        await supervisor.step()
    assert supervisor.health.all_up and supervisor.told_version == 1  # health and catalog ran
    failed = {getattr(r, "target", None) for r in caplog.records} - {None}
    assert failed == {"api-0", "shard-0", "shard-1"}  # each failed call, named


async def test_a_catalog_tell_that_fails_is_retried_next_time(
    parts: tuple[Supervisor, FakeActors, FakeCatalog],
) -> None:
    supervisor, actors, _ = parts
    await supervisor.health.check()
    actors.broken = {"reload"}
    await supervisor.watch_catalog()
    assert supervisor.told_version is None
    actors.broken = set()
    await supervisor.watch_catalog()
    assert supervisor.told_version == 1


async def test_a_substep_that_raises_does_not_end_the_step(
    parts: tuple[Supervisor, FakeActors, FakeCatalog], caplog: pytest.LogCaptureFixture
) -> None:
    supervisor, _, _ = parts

    async def bug() -> None:
        raise ZeroDivisionError("a bug")

    setattr(supervisor, "watch_stream", bug)  # noqa: B010 - a bug planted in one sub-step
    with caplog.at_level(logging.ERROR):
        await supervisor.step()
    assert supervisor.substep_failures == {"stream": 1} and supervisor.steps == 1
    assert any(getattr(r, "step", None) == "stream" and r.exc_info for r in caplog.records)


async def test_health_goes_on_while_postgresql_does_not_answer(
    parts: tuple[Supervisor, FakeActors, FakeCatalog], monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL down: each of the upkeep's reads waits out the pool's timeout (here: never
    answers). The health checks and their pushes to the API hosts go on at their own pace, so a
    hung shard is still found and `mabrec status` is current. (Once, health waited behind the
    upkeep: a round every 5-15 s during an outage.)"""
    supervisor, actors, _ = parts
    monkeypatch.setattr(supervisor_module, "STEP_PERIOD", 0.01)
    monkeypatch.setattr(supervisor.state_store, "oldest_checkpoint", asyncio.Event().wait)

    def pushes() -> int:
        return sum(1 for _, method in actors.calls if method == "set_health")

    loops = asyncio.create_task(supervisor.run())
    try:
        async with asyncio.timeout(10):  # 20 rounds take ~0.3 s; behind a read that never ends, forever
            while pushes() < 20:
                await asyncio.sleep(0.05)
    finally:
        loops.cancel()
        await asyncio.gather(loops, return_exceptions=True)
    assert supervisor.stream_last_seq == 42  # the stream read ran; the checkpoint read still hangs


async def test_stopping_stops_the_api_then_the_router_then_the_shards(
    parts: tuple[Supervisor, FakeActors, FakeCatalog],
) -> None:
    supervisor, actors, _ = parts
    await supervisor.stop_actors()
    assert [a for a, m in actors.calls if m == "stop"] == ["api-0", "router", "shard-0", "shard-1"]


async def test_retention_that_trimmed_uncheckpointed_events_is_reported(
    parts: tuple[Supervisor, FakeActors, FakeCatalog], caplog: pytest.LogCaptureFixture
) -> None:
    supervisor, _, _ = parts
    await supervisor.watch_stream()
    assert supervisor.retention_lost == 0  # the log starts at #1
    supervisor.js.first_seq = 31  # type: ignore[attr-defined]  # retention trimmed #1-#30 ...
    supervisor.state_store.oldest = 20  # type: ignore[attr-defined]  # ... and a checkpoint holds only #1-#20
    with caplog.at_level(logging.ERROR):
        await supervisor.watch_stream()
    assert supervisor.retention_lost == 10 and supervisor.snapshot()["retention_lost"] == 10
    assert any("lost to retention" in r.getMessage() for r in caplog.records)
