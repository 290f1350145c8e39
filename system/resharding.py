"""Moving slots between live shards: a re-shard, or one step of a rolling restart.

The hand-off, as Akka's cluster sharding does it: the coordinator (the supervisor) stops what
routes events, lets the shards that give slots up and the ones that take them finish what is in
flight, has the old owners checkpoint and let go, hands the slots over in PostgreSQL, and only
then has the new owners take them (a new epoch each) and routing resume with the new map.

- Events are never lost or applied twice: the router is paused in PostgreSQL (a router that
  restarts meanwhile waits too); a source's final checkpoint covers everything it applied for
  the slots, and a target takes each slot at its checkpoint position and replays what it lacks.
- Requests are never refused: a slate for a slot in flight reaches a shard that no longer (or
  not yet) owns it, which says so; the API asks again by the slot map it is pushed after the move.
- It is quick whatever the number of users: no user's state travels; the new owner loads each
  from PostgreSQL when first needed.

What a move that fails leaves: every slot with exactly one owner that serves it, as the map in
PostgreSQL says, and routing resumed; the supervisor tries the change again later.
- Before the map changes (the router's pause, the catch-up, a release, the map's write): the
  old layout. Sources that let their slots go take them back; a shard whose call failed or did
  not answer in time is restarted (killed, so a release still running cannot complete after the
  move was called off): its restore takes exactly what the map gives it.
- After the map changed (an acquire): the new layout. A target whose acquire failed or timed
  out is restarted, and its restore takes the slots the map now gives it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from system.core.errors import Unavailable
from system.core.health import ROUTER, Actors, shard_key
from system.core.placement import moves
from system.core.sharding import SlotMap
from system.db.state_store import StateStore
from system.tasks import gather_logged

log = logging.getLogger(__name__)

CATCH_UP_SECONDS = 20.0  # how long shards get to apply what was routed before the pause
HANDOFF_TIMEOUT = 60.0  # a release (with its checkpoint) or an acquire (with its replay)


@dataclass
class Progress:
    """What `mabrec status` and `mabrec scale` show of a change in progress."""

    what: str
    slots: int = 0
    moved: int = 0
    began: float = field(default_factory=time.time)
    steps: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "what": self.what,
            "slots": self.slots,
            "moved": self.moved,
            "seconds": round(time.time() - self.began, 1),
        }


async def move(
    actors: Actors,
    store: StateStore,
    current: SlotMap,
    target: SlotMap,
    shards: int,
    progress: Progress,
    publish_map: Callable[[SlotMap], Awaitable[None]],
) -> None:
    """Hand the slots that `target` gives to another shard over, with traffic flowing. `shards`
    is how many shard actors run (some may own no slot)."""
    plan = moves(current, target)
    if not plan:
        return
    progress.slots += len(plan)
    sources = sorted({src for src, _ in plan.values()})
    targets = sorted({dst for _, dst in plan.values()})
    began = time.monotonic()
    await store.pause_routing(True)
    try:
        position = await actors.call(ROUTER, "pause", shards, timeout=10)
        await _caught_up(actors, sorted(set(sources) | set(targets)), position)
        slots = {src: [slot for slot, (s, _) in plan.items() if s == src] for src in sources}
        await _release(actors, slots)
        try:
            await store.move_slots({slot: dst for slot, (_, dst) in plan.items()})
        except BaseException:
            await _take_back(actors, slots)
            raise
        await _acquire(actors, plan, targets)
        await publish_map(target)
        progress.moved += len(plan)
    finally:
        await store.pause_routing(False)
        try:
            await actors.call(ROUTER, "resume", timeout=10)
        except Exception as exc:  # noqa: BLE001 - the health check starts it; unpaused in PostgreSQL
            log.warning("router did not resume at once", extra={"error": repr(exc)})
    log.info(
        "slots moved",
        extra={"slots": len(plan), "from": sources, "to": targets, "seconds": round(time.monotonic() - began, 3)},
    )


async def _caught_up(actors: Actors, shards: list[int], position: int) -> None:
    """Wait until these shards applied the stream through `position` (routed before the pause)."""
    deadline = time.monotonic() + CATCH_UP_SECONDS
    while True:
        statuses = await asyncio.gather(*(actors.call(shard_key(s), "status", timeout=5) for s in shards))
        behind = [s for s, st in zip(shards, statuses, strict=True) if not st["ready"] or st["covered_seq"] < position]
        if not behind:
            return
        if time.monotonic() > deadline:
            raise Unavailable(f"shards {behind} did not reach #{position} in {CATCH_UP_SECONDS} s")
        await asyncio.sleep(0.02)


async def _release(actors: Actors, slots: dict[int, list[int]]) -> None:
    """Every source checkpoints and lets its slots go. If one cannot (an error, or no answer in
    time), the move is called off with the old layout whole: the sources that let go take their
    slots back, and those that did not answer are restarted (their release may still be running)."""
    done = await gather_logged(
        {
            str(src): actors.call(shard_key(src), "release", mine, timeout=HANDOFF_TIMEOUT)
            for src, mine in slots.items()
        },
        "releasing slots",
    )
    if len(done) == len(slots):
        return
    failed = sorted(src for src in slots if str(src) not in done)
    for src in failed:
        _restart(actors, src, "it could not release its slots")
    await _take_back(actors, {src: mine for src, mine in slots.items() if str(src) in done})
    raise Unavailable(f"shards {failed} could not release their slots; move called off, the old layout kept")


async def _take_back(actors: Actors, slots: dict[int, list[int]]) -> None:
    """Sources that released their slots take them back (the map still gives them theirs); one
    that cannot is restarted, and its restore takes them."""
    done = await gather_logged(
        {
            str(src): actors.call(shard_key(src), "acquire", mine, timeout=HANDOFF_TIMEOUT)
            for src, mine in slots.items()
        },
        "taking released slots back",
    )
    for src in sorted(slots):
        if str(src) not in done:
            _restart(actors, src, "it could not take its slots back")


async def _acquire(actors: Actors, plan: dict[int, tuple[int, int]], targets: list[int]) -> None:
    """Every target takes its new slots. One that cannot is restarted: its restore takes every
    slot the map gives it, at their checkpoints, which is the same thing."""
    slots = {dst: [slot for slot, (_, d) in plan.items() if d == dst] for dst in targets}
    done = await gather_logged(
        {str(dst): actors.call(shard_key(dst), "acquire", slots[dst], timeout=HANDOFF_TIMEOUT) for dst in targets},
        "acquiring slots",
    )
    for dst in targets:
        if str(dst) not in done:
            _restart(actors, dst, "it could not take its new slots")


def _restart(actors: Actors, shard: int, why: str) -> None:
    """A new process for the shard: its restore takes exactly the slots the map gives it."""
    log.error(f"restarting a shard: {why}", extra={"shard": shard})
    try:
        actors.restart(shard_key(shard))
    except Exception as exc:  # noqa: BLE001 - gone already (Ray restarts it anyway); the health check follows up
        log.warning("restart failed", extra={"shard": shard, "error": repr(exc)})
