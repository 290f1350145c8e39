"""`mabrec verify`: recount every user's state from the event log and compare it with the live
shards and with the checkpoints in PostgreSQL. Exactly-once means they are equal, bit for bit.

The recount is the reference one (system/core/recount.py): plain Python over the events, sharing
no code with the shards' arithmetic, cut at the sequence each side covers (the shard's `covered`
for live state, the slot's `covered_seq` for checkpoints). It needs the whole log: if retention
trimmed the stream, it says so and stops.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from system.bus import stream
from system.core import userstate
from system.core.errors import Unavailable
from system.core.events import decode
from system.core.recount import Row, recount
from system.core.settings import Settings
from system.core.shard_state import recent_from_bytes
from system.core.sharding import slot_of
from system.db.catalog_store import CatalogStore
from system.db.pool import short_lived_pool
from system.db.state_store import StateStore

# A user's state as compared: (rows (key, clicks, impressions, since_click), recent event id hashes).
State = tuple[list[Row], list[int]]
# A shard's snapshot as `Shard.export` gives it: (covered, {uxid: (counts bytes, recent bytes)}).
Export = tuple[int, dict[str, tuple[bytes, bytes]]]


def _state(counts: bytes, recent: bytes) -> State:
    rows = [(r[0], r[1], r[2], r[3]) for r in userstate.from_bytes(counts).tolist()]
    return rows, list(recent_from_bytes(recent))


@dataclass
class Comparison:
    users: int = 0
    mismatches: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, uxid: str, expected: State | None, actual: State | None) -> None:
        self.users += 1
        if (expected or ([], [])) != (actual or ([], [])):
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
    settings: Settings, export: Callable[[int], Awaitable[Export]], shards: int, catch_up_timeout: float = 30.0
) -> Report:
    """`export(shard)` gives that shard's snapshot (see Export)."""
    began = time.monotonic()
    nc = await stream.connect(settings.nats_url or "", f"{settings.namespace}-verify")
    try:
        async with short_lived_pool(settings.database_url or "", "verify") as pool:
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
            live: dict[int, Export] = {}
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
            stored = {u: _state(c, r) for u, c, r in await store.load_users(range(len(slot_map.owners)))}

            through = max([c for c, _ in live.values()] + list(slot_covered.values()) + [0])
            log = [
                (m.seq, decode(m.data)[0]) async for batch in stream.read_range(js, settings, 0, through) for m in batch
            ]
    finally:
        await nc.close()

    facets_of = catalog.facet_ids_by_movie()
    live_recount = recount(log, facets_of, lambda user: live[slot_map.shard_of(user)][0])
    stored_recount = recount(log, facets_of, lambda user: slot_covered[slot_of(user)])
    live_cmp, stored_cmp = Comparison(), Comparison()
    live_users = {u: _state(c, r) for _, users in live.values() for u, (c, r) in users.items()}
    for uxid in sorted(set(live_recount) | set(live_users)):
        expected = live_recount.get(uxid)
        live_cmp.add(uxid, (expected.rows(), expected.recent) if expected else None, live_users.get(uxid))
    for uxid in sorted(set(stored_recount) | set(stored)):
        expected = stored_recount.get(uxid)
        stored_cmp.add(uxid, (expected.rows(), expected.recent) if expected else None, stored.get(uxid))
    events = sum(len(events) for _, events in log)
    return Report(settings.stream, events, through, live_cmp, stored_cmp, lagging, time.monotonic() - began)


def _describe(state: State | None) -> str:
    if state is None or not state[0]:
        return "(no state)"
    rows = state[0]
    return f"{len(rows)} rows, {sum(r[1] for r in rows)} clicks, {sum(r[2] for r in rows)} seen"


def render(report: Report, as_json: bool) -> str:
    """The report as `mabrec verify` prints it."""
    if as_json:
        return orjson.dumps(report.as_dict(), option=orjson.OPT_INDENT_2).decode()
    lines = [
        f"recounted {report.events} events of stream {report.stream} (through #{report.through}) in {report.seconds:.1f}s",
        f"live state:   {report.live.users} users checked, {report.live.mismatches} mismatches",
        f"checkpoints:  {report.checkpoints.users} users checked, {report.checkpoints.mismatches} mismatches",
        *(f"  {line}" for line in report.lagging + report.live.examples + report.checkpoints.examples),
        "OK: every posterior equals the recount" if report.ok else "MISMATCH",
    ]
    return "\n".join(lines)
