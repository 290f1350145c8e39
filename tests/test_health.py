"""The supervisor's health decisions, against a fake of the Ray wrapper (`Actors`)."""

from __future__ import annotations

from typing import Any

import pytest

from system.core import health
from system.core.errors import Restarting, TimedOut, Unavailable
from system.core.health import HealthMonitor

UP = {"ensure_ready": "ready", "ensure_running": "running", "ensure_serving": "serving"}


class FakeActors:
    """Actors by key that answer, hang (a timeout) or are down (Ray restarting them)."""

    def __init__(self) -> None:
        self.behaviour: dict[str, str] = {}  # actor -> "ok" | "hang" | "crashed"
        self.restarted: list[str] = []

    async def call(self, actor: str, method: str, *args: Any, timeout: float) -> Any:
        mode = self.behaviour.get(actor, "ok")
        if mode == "hang":
            raise TimedOut(f"{actor} timed out")
        if mode == "crashed":
            raise Restarting(f"{actor} is restarting")
        if mode == "broken":
            raise Unavailable(f"{actor} is broken: applying a span failed 3 times")
        return {UP[method]: True, "users": 3, "port": 8000}

    def restart(self, actor: str) -> None:
        self.restarted.append(actor)
        if self.behaviour.get(actor) != "broken":  # a bug comes back with the new process
            self.behaviour[actor] = "ok"


async def test_all_up_once_every_actor_answered() -> None:
    monitor = HealthMonitor(FakeActors(), 3, 2)
    assert not monitor.all_up
    await monitor.check()
    assert monitor.all_up and monitor.shards[2].status["users"] == 3 and monitor.apis[1].status["port"] == 8000
    snapshot = monitor.snapshot()
    assert len(snapshot["shards"]) == 3 and snapshot["router"]["running"] and len(snapshot["apis"]) == 2


async def test_a_hung_actor_is_restarted_after_threshold_timeouts() -> None:
    actors = FakeActors()
    actors.behaviour["shard-1"] = "hang"
    monitor = HealthMonitor(actors, 2, threshold=3, grace=0)
    for _ in range(2):
        await monitor.check()
    assert actors.restarted == [] and not monitor.shards[1].up and monitor.shards[0].up
    assert "timed out" in monitor.shards[1].status["last_error"]
    await monitor.check()
    assert actors.restarted == ["shard-1"] and monitor.shards[1].restarts == 1
    await monitor.check()
    assert monitor.all_up and monitor.shards[1].status["restarts"] == 1


async def test_a_hung_api_host_is_restarted_too() -> None:
    actors = FakeActors()
    actors.behaviour["api-0"] = "hang"
    monitor = HealthMonitor(actors, 1, 1, threshold=2, grace=0)
    for _ in range(3):
        await monitor.check()
    assert actors.restarted == ["api-0"] and monitor.all_up


async def test_a_crashed_actor_is_left_to_ray() -> None:
    actors = FakeActors()
    actors.behaviour["router"] = "crashed"
    monitor = HealthMonitor(actors, 1, threshold=1)
    for _ in range(3):
        await monitor.check()
    assert actors.restarted == [] and not monitor.all_up
    assert "restarting" in monitor.router.status["last_error"]


async def test_one_success_resets_the_failure_count() -> None:
    actors = FakeActors()
    monitor = HealthMonitor(actors, 1, threshold=2, grace=0)
    for mode in ("hang", "ok", "hang"):
        actors.behaviour["shard-0"] = mode
        await monitor.check()
    assert actors.restarted == []
    actors.behaviour["shard-0"] = "hang"
    await monitor.check()
    assert actors.restarted == ["shard-0"]


async def test_a_check_never_raises() -> None:
    class Broken(FakeActors):
        async def call(self, actor: str, method: str, *args: Any, timeout: float) -> Any:
            raise KeyError("a bug")

        def restart(self, actor: str) -> None:
            raise RuntimeError("already gone")

    monitor = HealthMonitor(Broken(), 1, threshold=1)
    await monitor.check()  # the bug is recorded, and the failed restart too; nothing escapes
    assert not monitor.all_up and "KeyError" in monitor.shards[0].status["last_error"]
    assert monitor.shards[0].restarts == 1


async def test_a_starting_actor_may_be_slow_and_a_slow_one_keeps_its_state() -> None:
    """Timeouts while an actor starts (Ray creating its process) do not count; once it was up they
    do, at once (a shard that hung just after the start waited out the whole grace: 29-33 s to be
    replaced in the chaos test), and a timeout marks it slow, but what it last said (ready)
    stands: busy is not down."""
    actors = FakeActors()
    monitor = HealthMonitor(actors, 1, threshold=1, grace=30)
    actors.behaviour["shard-0"] = "hang"
    for _ in range(3):
        await monitor.check()
    assert actors.restarted == []  # within the grace
    actors.behaviour["shard-0"] = "ok"
    await monitor.check()  # up: its grace is over, whatever time it is
    actors.behaviour["shard-0"] = "hang"
    await monitor.check()
    status = monitor.shards[0].status
    assert status["ready"] and status["slow"] and not monitor.shards[0].answering
    assert actors.restarted == ["shard-0"]  # threshold 1: restarted


async def test_a_shard_that_stays_broken_is_replaced_less_and_less_often(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug is not an outage: a shard that says it is broken is replaced after `threshold` checks,
    and while the replacements keep breaking, each waits twice as long as the one before."""
    clock = [1000.0]
    monkeypatch.setattr("system.core.health.time.monotonic", lambda: clock[0])
    actors = FakeActors()
    actors.behaviour["shard-0"] = "broken"
    monitor = HealthMonitor(actors, 1, threshold=3, grace=0)
    restarts_at: list[float] = []
    for _ in range(200):  # a check a second, for 200 s
        before = len(actors.restarted)
        await monitor.check()
        if len(actors.restarted) > before:
            restarts_at.append(clock[0])
        clock[0] += 1.0
    gaps = [b - a for a, b in zip(restarts_at, restarts_at[1:], strict=False)]
    assert len(restarts_at) >= 4 and all(g >= health.RESTART_PAUSE * 2**k for k, g in enumerate(gaps)), gaps
    assert "broken" in monitor.shards[0].status["last_error"] and not monitor.shards[0].up
    # Fixed (a deploy): once up long enough, a later failure is not part of the loop any more.
    actors.behaviour["shard-0"] = "ok"
    while not monitor.shards[0].up or clock[0] < monitor.shards[0].restart_after:
        await monitor.check()
        clock[0] += 1.0
    for _ in range(int(health.STABLE_SECONDS) + 2):
        await monitor.check()
        clock[0] += 1.0
    assert monitor.shards[0].streak == 0
