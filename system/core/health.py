"""The supervisor's health decisions, independent of Ray (tested with a fake `Actors`).

Each round every actor gets one idempotent "ensure" call: a shard restores itself if it is empty
(after a crash Ray restarts it with a bare constructor), the router starts its loop, an API host
starts serving. An answer updates the actor's status; a timeout or an error counts as a failure
(a crash needs no more: Ray is restarting it already); after `threshold` failures in a row the
actor is killed so that Ray restarts it. One check per actor is in flight at a time, and a
round never raises: every failure ends up in the actor's status and the log.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from system.core.errors import Restarting, TimedOut

log = logging.getLogger(__name__)


class Actors(Protocol):
    """The actors, by key ("shard-0", "router", "api-0"): what the supervisor's Ray wrapper does."""

    async def call(self, actor: str, method: str, *args: Any, timeout: float) -> Any: ...

    def restart(self, actor: str) -> None: ...


class Fleet(Actors, Protocol):
    """... and how the shards come and go when the deployment grows or shrinks."""

    def spawn_shard(self, shard: int) -> None: ...

    def remove(self, actor: str) -> None: ...


@dataclass
class Watched:
    """One actor under watch: the call that brings it up, and the status field that says it is."""

    key: str
    ensure: str
    up_field: str
    status: dict[str, Any] = field(default_factory=dict)
    failures: int = 0
    restarts: int = 0
    # Until then, timeouts do not count: a new actor's process is still starting (or restarting).
    grace_until: float = 0.0
    checking: bool = False  # one check in flight at a time
    # Restarts since it was last up for STABLE_SECONDS: each one waits longer than the last (a
    # crash loop backs off), from `restart_after` on.
    streak: int = 0
    restart_after: float = 0.0
    up_since: float | None = None

    @property
    def up(self) -> bool:
        return bool(self.status.get(self.up_field))

    @property
    def answering(self) -> bool:
        """Up, and its last check answered in time: worth calling for anything else."""
        return self.up and not self.status.get("slow")


def shard_key(shard: int) -> str:
    return f"shard-{shard}"


def api_key(index: int) -> str:
    return f"api-{index}"


ROUTER = "router"
STARTING_GRACE = 30.0  # seconds a new (or restarted) actor may take to be up; up, its grace ends
# A crash loop backs off: the n-th restart in a row waits RESTART_PAUSE * 2**(n-1) seconds (at
# most RESTART_PAUSE_MAX) after the one before; an actor up for STABLE_SECONDS starts anew.
RESTART_PAUSE, RESTART_PAUSE_MAX, STABLE_SECONDS = 5.0, 300.0, 120.0


class HealthMonitor:
    def __init__(
        self,
        actors: Actors,
        shards: int,
        apis: int = 0,
        *,
        threshold: int = 3,
        timeout: float = 2.0,
        grace: float = STARTING_GRACE,
    ) -> None:
        self.actors = actors
        self.threshold = threshold
        self.timeout = timeout
        self.grace = grace
        self.shards = [self._shard(s) for s in range(shards)]
        self.router = Watched(ROUTER, "ensure_running", "running", grace_until=time.monotonic() + grace)
        self.apis = [
            Watched(api_key(a), "ensure_serving", "serving", {"api": a}, grace_until=time.monotonic() + grace)
            for a in range(apis)
        ]

    def _shard(self, shard: int) -> Watched:
        return Watched(
            shard_key(shard), "ensure_ready", "ready", {"shard": shard}, grace_until=time.monotonic() + self.grace
        )

    def starting(self, watched: Watched) -> None:
        """`watched` is being (re)started: its timeouts do not count for a while."""
        watched.grace_until = time.monotonic() + self.grace

    def resize(self, shards: int) -> None:
        """Watch `shards` shards from now on (a re-shard added some, or retired some; the new
        ones get the starting grace)."""
        self.shards = self.shards[:shards] + [self._shard(s) for s in range(len(self.shards), shards)]

    @property
    def watched(self) -> list[Watched]:
        return [*self.shards, self.router, *self.apis]

    @property
    def all_up(self) -> bool:
        return all(w.up for w in self.watched)

    def snapshot(self) -> dict[str, Any]:
        return {
            "shards": [w.status for w in self.shards],
            "router": self.router.status,
            "apis": [w.status for w in self.apis],
        }

    async def check(self) -> None:
        """One round: every actor checked once, concurrently."""
        await asyncio.gather(*(self._check(w) for w in self.watched))

    async def _check(self, watched: Watched) -> None:
        if watched.checking:
            return  # the last one is still out
        watched.checking = True
        try:
            status = await self.actors.call(watched.key, watched.ensure, timeout=self.timeout)
        except TimedOut as exc:
            # No answer in time: busy, or hung. What it said last stands (a busy shard still
            # serves), marked slow; enough of these in a row and it is restarted.
            watched.status = {**watched.status, "slow": True, "last_error": repr(exc), "checked": time.time()}
            self._failed(watched, exc)
            return
        except Exception as exc:  # noqa: BLE001 - every failure is a health fact, recorded below
            watched.status = {
                **watched.status,
                watched.up_field: False,
                "last_error": repr(exc),
                "checked": time.time(),
            }
            self._failed(watched, exc)
            return
        finally:
            watched.checking = False
        watched.failures = 0
        watched.status = {**status, "restarts": watched.restarts, "checked": time.time()}
        now = time.monotonic()
        if watched.up:
            watched.grace_until = 0.0  # started: from now on a hang counts (it was up to 30 s late)
        if not watched.up:
            watched.up_since = None
        elif watched.up_since is None:
            watched.up_since = now
        elif now - watched.up_since > STABLE_SECONDS:
            watched.streak = 0  # it held: a later failure is not part of a loop

    def _failed(self, watched: Watched, exc: Exception) -> None:
        if isinstance(exc, Restarting):
            self.starting(watched)  # Ray is restarting it: give it time
            return
        if isinstance(exc, TimedOut) and time.monotonic() < watched.grace_until:
            return  # still starting
        watched.failures += 1
        watched.up_since = None
        log.warning(
            "health check failed", extra={"actor": watched.key, "failures": watched.failures, "error": repr(exc)}
        )
        if watched.failures < self.threshold:
            return
        now = time.monotonic()
        if now < watched.restart_after:
            return  # restarted lately, and failing again: it waits its turn (logged at the restart)
        watched.failures = 0
        watched.restarts += 1
        watched.streak += 1
        pause = min(RESTART_PAUSE * 2 ** (watched.streak - 1), RESTART_PAUSE_MAX)
        watched.restart_after = now + pause
        self.starting(watched)
        log.error(
            "restarting an actor that is unresponsive or broken",
            extra={"actor": watched.key, "error": repr(exc), "in_a_row": watched.streak, "next_not_before_s": pause},
        )
        try:
            self.actors.restart(watched.key)
        except Exception as kill_exc:  # noqa: BLE001 - an actor already gone: Ray restarts it anyway
            log.warning("restart failed", extra={"actor": watched.key, "error": repr(kill_exc)})
