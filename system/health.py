"""The supervisor's health decisions, independent of Ray (tested with a fake `Actors`).

Each period every actor gets one idempotent "ensure" call: a shard restores itself if it is
empty (after a crash Ray restarts it with a bare constructor), the consumer starts its loop if
it is not running. An answer updates the actor's status; a timeout or an error counts as a
failure (a crash needs no more: Ray is restarting it already); after `threshold` failures in a
row the actor is killed so Ray restarts it. One check
per actor is in flight at a time, and nothing here ever raises.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Any, Protocol

from system.errors import Restarting

log = logging.getLogger(__name__)


class Actors(Protocol):
    async def shard(self, shard: int, method: str, *args: Any, timeout: float = ...) -> Any: ...

    async def route(self, method: str, *args: Any, timeout: float = ...) -> Any: ...

    async def api(self, index: int, method: str, *args: Any, timeout: float = ...) -> Any: ...

    def restart_shard(self, shard: int) -> None: ...

    def restart_router(self) -> None: ...

    def restart_api(self, index: int) -> None: ...


class HealthMonitor:
    def __init__(self, actors: Actors, shards: int, apis: int = 0, *, threshold: int = 3, timeout: float = 2.0) -> None:
        self.actors = actors
        self.shard_count = shards
        self.api_count = apis
        self.threshold = threshold
        self.timeout = timeout
        self.shards: dict[int, dict[str, Any]] = {s: {"shard": s, "ready": False} for s in range(shards)}
        self.consumer: dict[str, Any] = {"running": False}
        self.apis: dict[int, dict[str, Any]] = {a: {"api": a, "serving": False} for a in range(apis)}
        self.failures: dict[str, int] = {}
        self.restarts: dict[str, int] = {}

    @property
    def all_ready(self) -> bool:
        return (
            all(s.get("ready") for s in self.shards.values())
            and bool(self.consumer.get("running"))
            and all(a.get("serving") for a in self.apis.values())
        )

    def snapshot(self) -> dict[str, Any]:
        return {"shards": list(self.shards.values()), "consumer": self.consumer, "apis": list(self.apis.values())}

    async def check(self) -> None:
        await asyncio.gather(
            *(self._check_shard(s) for s in range(self.shard_count)),
            self._check_consumer(),
            *(self._check_api(a) for a in range(self.api_count)),
        )

    async def run(self, period: float = 1.0, after_check: Any = None) -> None:
        """Check forever; `after_check(self)` (async) runs after each round, its errors logged."""
        while True:
            await self.check()
            if after_check is not None:
                try:
                    await after_check(self)
                except Exception as exc:
                    log.warning("after-check hook failed", extra={"error": repr(exc)})
            await asyncio.sleep(period * random.uniform(0.8, 1.2))  # jitter: no lockstep with other loops

    async def _check_shard(self, shard: int) -> None:
        key = f"shard-{shard}"
        try:
            status = await self.actors.shard(shard, "ensure_ready", timeout=self.timeout)
        except Exception as exc:
            self.shards[shard] = {**self.shards[shard], "ready": False, "last_error": repr(exc), "checked": time.time()}
            self._failed(key, exc, lambda: self.actors.restart_shard(shard))
            return
        self.failures[key] = 0
        self.shards[shard] = {**status, "restarts": self.restarts.get(key, 0), "checked": time.time()}

    async def _check_consumer(self) -> None:
        try:
            status = await self.actors.route("ensure_running", timeout=self.timeout)
        except Exception as exc:
            self.consumer = {**self.consumer, "running": False, "last_error": repr(exc)}
            self._failed("consumer", exc, self.actors.restart_router)
            return
        self.failures["consumer"] = 0
        self.consumer = {**status, "restarts": self.restarts.get("consumer", 0)}

    async def _check_api(self, index: int) -> None:
        key = f"api-{index}"
        try:
            status = await self.actors.api(index, "ensure_serving", timeout=self.timeout)
        except Exception as exc:
            self.apis[index] = {**self.apis[index], "serving": False, "last_error": repr(exc)}
            self._failed(key, exc, lambda: self.actors.restart_api(index))
            return
        self.failures[key] = 0
        self.apis[index] = {**status, "restarts": self.restarts.get(key, 0)}

    def _failed(self, key: str, exc: Exception, restart: Any) -> None:
        if isinstance(exc, Restarting):
            return  # Ray is already restarting it; the next check restores it
        self.failures[key] = self.failures.get(key, 0) + 1
        log.warning("health check failed", extra={"actor": key, "failures": self.failures[key], "error": repr(exc)})
        if self.failures[key] >= self.threshold:
            self.failures[key] = 0
            self.restarts[key] = self.restarts.get(key, 0) + 1
            log.error("restarting unresponsive actor", extra={"actor": key})
            try:
                restart()
            except Exception as kill_exc:  # an actor already gone: Ray restarts it anyway
                log.warning("restart failed", extra={"actor": key, "error": repr(kill_exc)})
