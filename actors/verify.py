"""`mabrec verify`: recount every user's state from the event log and compare it with the live
shards and with the checkpoints in PostgreSQL. Exactly-once means they are equal, bit for bit.

The recount reads the stream from its first message and applies each event with the same code
the shards use (ShardState: same validation, same per-user de-duplication), cut at the sequence
each side covers: the shard's `covered` for live state, the slot's `covered_seq` for
checkpoints. It needs the whole log: if retention trimmed the stream, it says so and stops.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from actors.shard_state import ShardState, recent_to_bytes
from system import bus, db, userstate
from system.catalog import Catalog
from system.errors import Unavailable
from system.events import Event, decode
from system.settings import Settings
from system.sharding import SlotMap, slot_of
from system.store import CatalogStore, StateStore


@dataclass
class Comparison:
    users: int = 0
    mismatches: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, uxid: str, expected: tuple[bytes, bytes] | None, actual: tuple[bytes, bytes] | None) -> None:
        self.users += 1
        if _normalized(expected) != _normalized(actual):
            self.mismatches += 1
            if len(self.examples) < 5:
                self.examples.append(f"{uxid}: recount {_describe(expected)} != state {_describe(actual)}")


@dataclass
class Report:
    stream: str
    events: int
    through: int
    live: Comparison
    checkpoints: Comparison
    lagging: list[str]
    seconds: float

    @property
    def ok(self) -> bool:
        return not (self.live.mismatches or self.checkpoints.mismatches or self.lagging)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "stream": self.stream,
            "events_recounted": self.events,
            "through_seq": self.through,
            "live": vars(self.live),
            "checkpoints": vars(self.checkpoints),
            "lagging": self.lagging,
            "seconds": round(self.seconds, 2),
        }


async def verify(
    settings: Settings, export: Callable[[int], Any], shards: int, catch_up_timeout: float = 30.0
) -> Report:
    """`export(shard)` is an awaitable giving that shard's (covered, {uxid: state}) snapshot."""
    began = time.monotonic()
    nc = await bus.connect(settings.nats_url or "", f"{settings.namespace}-verify")
    pool = await db.open_pool(settings.database_url or "", name="verify")
    try:
        js = nc.jetstream()
        info = await js.stream_info(settings.stream)
        if info.state.first_seq > 1 and info.state.messages:
            raise Unavailable(
                f"stream {settings.stream} starts at #{info.state.first_seq}: retention trimmed the event log,"
                " so a recount cannot reproduce the state"
            )
        target = info.state.last_seq
        catalog = await CatalogStore(pool).read()
        store = StateStore(pool)
        slot_map = await store.slot_map()

        # Live state, once every shard has applied the stream as it was when we started.
        lagging: list[str] = []
        live: dict[int, tuple[int, dict[str, tuple[bytes, bytes]]]] = {}
        deadline = time.monotonic() + catch_up_timeout
        for shard in range(shards):
            while True:
                covered, users = await export(shard)
                if covered >= target or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
            if covered < target:
                lagging.append(f"shard {shard} applied through #{covered}, the stream ends at #{target}")
            live[shard] = (covered, users)

        # What PostgreSQL holds (read after the live snapshots: checkpoints only move forward).
        slot_covered = await store.covered_by_slot(range(len(slot_map.owners)))
        stored = {u: (c, r) for u, c, r in await store.load_users(range(len(slot_map.owners)))}

        through = max([c for c, _ in live.values()] + list(slot_covered.values()) + [0])
        log_events = [
            (m.seq, decode(m.data)[0]) async for batch in bus.read_range(js, settings, 0, through) for m in batch
        ]
    finally:
        await nc.close()
        await pool.close()

    live_recount = _recount(catalog, slot_map, log_events, lambda user: live[slot_map.shard_of(user)][0])
    stored_recount = _recount(catalog, slot_map, log_events, lambda user: slot_covered[slot_of(user)])
    live_cmp, stored_cmp = Comparison(), Comparison()
    live_users = {u: x for _, users in live.values() for u, x in users.items()}
    for uxid in sorted(set(live_recount) | set(live_users)):
        live_cmp.add(uxid, live_recount.get(uxid), live_users.get(uxid))
    for uxid in sorted(set(stored_recount) | set(stored)):
        stored_cmp.add(uxid, stored_recount.get(uxid), stored.get(uxid))
    events = sum(len(events) for _, events in log_events)
    return Report(settings.stream, events, through, live_cmp, stored_cmp, lagging, time.monotonic() - began)


def _recount(
    catalog: Catalog, slot_map: SlotMap, log_events: list[tuple[int, list[Event]]], cutoff: Callable[[str], int]
) -> dict[str, tuple[bytes, bytes]]:
    """Apply, in stream order, every event at or below its user's cutoff, with the shards' code."""
    states = {shard: ShardState(catalog, rng=np.random.default_rng(0)) for shard in range(slot_map.shards)}
    for seq, events in log_events:
        mine = [e for e in events if seq <= cutoff(e.user)]
        for event in mine:
            states[slot_map.shard_of(event.user)].apply([event])
    return {
        uxid: (userstate.to_bytes(user.counts), recent_to_bytes(user.recent))
        for state in states.values()
        for uxid, user in state.users.items()
    }


def _normalized(state: tuple[bytes, bytes] | None) -> tuple[bytes, bytes]:
    return state if state is not None else (b"", b"")


def _describe(state: tuple[bytes, bytes] | None) -> str:
    if state is None or not state[0]:
        return "(no state)"
    rows = userstate.from_bytes(state[0])
    return f"{len(rows)} rows, {int(rows[:, userstate.CLICKS].sum())} clicks, {int(rows[:, userstate.SEEN].sum())} seen"
