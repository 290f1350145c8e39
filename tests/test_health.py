"""The supervisor's health decisions, against a fake of the Ray wrapper (`Actors`)."""

from __future__ import annotations

import asyncio
from typing import Any

from system.errors import Restarting, TimedOut
from system.health import HealthMonitor


class FakeActors:
    def __init__(self) -> None:
        self.behaviour: dict[str, str] = {}  # actor -> "ok" | "hang" | "crashed"
        self.restarted: list[str] = []

    async def _answer(self, key: str, status: dict[str, Any]) -> dict[str, Any]:
        mode = self.behaviour.get(key, "ok")
        if mode == "hang":
            raise TimedOut(f"{key} timed out")
        if mode == "crashed":
            raise Restarting(f"{key} is restarting")
        return status

    async def shard(self, shard: int, method: str, *args: Any, timeout: float = 1.0) -> Any:
        assert method == "ensure_ready"
        return await self._answer(f"shard-{shard}", {"shard": shard, "ready": True, "users": 3})

    async def route(self, method: str, *args: Any, timeout: float = 1.0) -> Any:
        assert method == "ensure_running"
        return await self._answer("consumer", {"running": True})

    async def api(self, index: int, method: str, *args: Any, timeout: float = 1.0) -> Any:
        assert method == "ensure_serving"
        return await self._answer(f"api-{index}", {"api": index, "serving": True, "port": 8000})

    def restart_api(self, index: int) -> None:
        self.restarted.append(f"api-{index}")
        self.behaviour[f"api-{index}"] = "ok"

    def restart_shard(self, shard: int) -> None:
        self.restarted.append(f"shard-{shard}")
        self.behaviour[f"shard-{shard}"] = "ok"

    def restart_router(self) -> None:
        self.restarted.append("consumer")


async def test_all_ready() -> None:
    monitor = HealthMonitor(FakeActors(), 3, 2)
    assert not monitor.all_ready
    await monitor.check()
    assert monitor.all_ready and monitor.shards[2]["users"] == 3 and monitor.apis[1]["port"] == 8000
    snapshot = monitor.snapshot()
    assert len(snapshot["shards"]) == 3 and snapshot["consumer"]["running"] and len(snapshot["apis"]) == 2


async def test_a_hung_api_is_restarted_and_pushes_go_on() -> None:
    actors = FakeActors()
    actors.behaviour["api-0"] = "hang"
    monitor = HealthMonitor(actors, 1, 1, threshold=2)
    pushed = []

    async def push(m: HealthMonitor) -> None:
        pushed.append(m.snapshot())
        if len(pushed) == 1:
            raise RuntimeError("one failed push must not stop the loop")

    task = asyncio.create_task(monitor.run(period=0.01, after_check=push))
    while len(pushed) < 4:
        await asyncio.sleep(0.01)
    task.cancel()
    assert actors.restarted == ["api-0"] and monitor.all_ready


async def test_a_hung_shard_is_restarted_after_threshold_timeouts() -> None:
    actors = FakeActors()
    actors.behaviour["shard-1"] = "hang"
    monitor = HealthMonitor(actors, 2, threshold=3)
    for _ in range(2):
        await monitor.check()
    assert actors.restarted == [] and not monitor.shards[1]["ready"] and monitor.shards[0]["ready"]
    await monitor.check()
    assert actors.restarted == ["shard-1"] and monitor.restarts["shard-1"] == 1
    await monitor.check()
    assert monitor.all_ready and monitor.shards[1]["restarts"] == 1


async def test_a_crashed_actor_is_left_to_ray() -> None:
    actors = FakeActors()
    actors.behaviour["consumer"] = "crashed"
    monitor = HealthMonitor(actors, 1, threshold=1)
    for _ in range(3):
        await monitor.check()
    assert actors.restarted == [] and not monitor.all_ready
    assert "restarting" in monitor.consumer["last_error"]


async def test_one_success_resets_the_failure_count() -> None:
    actors = FakeActors()
    monitor = HealthMonitor(actors, 1, threshold=2)
    actors.behaviour["shard-0"] = "hang"
    await monitor.check()
    actors.behaviour["shard-0"] = "ok"
    await monitor.check()
    actors.behaviour["shard-0"] = "hang"
    await monitor.check()
    assert actors.restarted == []


async def test_run_survives_unexpected_errors() -> None:
    class Broken(FakeActors):
        async def shard(self, shard: int, method: str, *args: Any, timeout: float = 1.0) -> Any:
            raise KeyError("bug")

    monitor = HealthMonitor(Broken(), 1, threshold=100)
    task = asyncio.create_task(monitor.run(period=0.01))
    await asyncio.sleep(0.1)
    assert not task.done()
    task.cancel()
