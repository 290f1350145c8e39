"""`mabrec verify`: recount every user's state from the event log and compare it with the live
shards and with the checkpoints in PostgreSQL. Exactly-once means they are equal, bit for bit.

The recount is the reference one (system/core/recount.py): plain Python over the events, sharing
no code with the shards' arithmetic, cut at the sequence each side covers (the shard's `covered`
for the users it holds in memory, the slot's `covered_seq` for checkpoints). Users not in memory
are as their checkpoints hold them, so the checkpoint comparison covers them. Global popularity
in PostgreSQL must equal the sum of every checkpointed user, key by key.

With the whole log in the stream, everything is recounted from the first event. When retention
has trimmed it, the checkpoints are the baseline: the live state must equal each checkpoint plus
the recount of the retained events after it, which needs every checkpoint to reach the retained
log (else events were lost to retention, and it says so).
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
from system.core.dedup import SeenIds
from system.core.errors import Unavailable
from system.core.events import Event, decode
from system.core.limits import DEDUP_MAX_IDS
from system.core.popularity import Popularity
from system.core.recount import Recounted, Row, recount
from system.core.settings import Settings
from system.core.sharding import slot_of
from system.db.catalog_store import CatalogStore
from system.db.erasure_store import ErasureStore
from system.db.pool import short_lived_pool
from system.db.state_store import StateStore

# A user's state as compared: rows (key, clicks, impressions, since_click), and the seen event
# ids: (hashes, stream seconds).
State = tuple[list[Row], tuple[list[int], list[int]]]
# A shard's snapshot as `Shard.export` gives it: (covered, {uxid: (counts bytes, seen ids bytes)}).
Export = tuple[int, dict[str, tuple[bytes, bytes]]]
NOTHING: State = ([], ([], []))


def _state(counts: bytes, seen: bytes) -> State:
    rows = [(r[0], r[1], r[2], r[3]) for r in userstate.from_bytes(counts).tolist()]
    ids = SeenIds.from_bytes(seen)
    return rows, (list(ids.ids), list(ids.at))


def _recounted(state: State) -> Recounted:
    rows, (ids, at) = state
    return Recounted({key: [c, i, s] for key, c, i, s in rows}, list(zip(ids, at, strict=True)))


def _expected(user: Recounted | None) -> State | None:
    return (user.rows(), user.seen_ids()) if user is not None else None


@dataclass
class Comparison:
    users: int = 0
    mismatches: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, uxid: str, expected: State | None, actual: State | None) -> None:
        self.users += 1
        if (expected or NOTHING) != (actual or NOTHING):
            self.mismatches += 1
            if len(self.examples) < 5:
                self.examples.append(f"{uxid}: recount {_describe(expected)} != state {_describe(actual)}")


@dataclass
class Report:
    stream: str
    events: int
    since: int  # the first sequence recounted (1: the whole log)
    through: int
    live: Comparison
    checkpoints: Comparison | None  # None: the checkpoints are the baseline (the log is trimmed)
    popularity_mismatches: int
    lagging: list[str]
    seconds: float
    erased_users: int = 0  # erasures recorded (never whom)
    redacted_messages: int = 0  # their messages, recounted from redacted copies

    @property
    def ok(self) -> bool:
        checkpoints = self.checkpoints.mismatches if self.checkpoints else 0
        return not (self.live.mismatches or checkpoints or self.popularity_mismatches or self.lagging)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "stream": self.stream,
            "events_recounted": self.events,
            "from_seq": self.since,
            "through_seq": self.through,
            "live": vars(self.live),
            "checkpoints": vars(self.checkpoints) if self.checkpoints else "the baseline (the log is trimmed)",
            "popularity_mismatches": self.popularity_mismatches,
            "lagging": self.lagging,
            "erased_users": self.erased_users,
            "redacted_messages": self.redacted_messages,
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
            first, target = (info.state.first_seq if info.state.messages else 1), info.state.last_seq
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
            snapshot = await store.snapshot()
            if first > 1 and min(snapshot.covered.values()) < first - 1:
                raise Unavailable(
                    f"stream {settings.stream} starts at #{first} but a checkpoint covers only through"
                    f" #{min(snapshot.covered.values())}: events between them were lost to retention"
                )
            through = max([c for c, _ in live.values()] + list(snapshot.covered.values()) + [0])
            # Erasures whose log scrub is under way (read first: one that ends meanwhile is
            # still here): their user's events through the erasure are leaving the log, and
            # count no more, wherever the scrub has got to.
            erasures = ErasureStore(pool)
            scrubbing = {uxid: upto for _, uxid, upto in await erasures.pending()}
            messages: dict[int, tuple[int, list[Event]]] = {
                m.seq: (m.second, m.decode(catalog.id_set)[0])
                async for batch in stream.read_range(js, settings, first - 1, through)
                for m in batch
            }
            # Messages that named an erased user: deleted from the stream, recounted from their
            # redacted copies (system/erasure.py); a copy wins over a message read before the
            # scrub deleted it.
            redacted = {seq: (second, data) for seq, second, data in await erasures.redacted(0, through)}
            while first - 1 in redacted:  # the stream's first messages were erased, not trimmed
                first -= 1
            trimmed = first > 1
            for seq, (second, data) in redacted.items():
                if seq >= first:
                    messages[seq] = (second, decode(data, None, catalog.id_set)[0])
            log = [
                (seq, second, [e for e in events if not seq <= scrubbing.get(e.user, 0)])
                for seq, (second, events) in sorted(messages.items())
            ]
            erased = await erasures.count()
    finally:
        await nc.close()

    facets_of = catalog.facet_ids_by_movie()
    stored = {u: _state(c, r) for u, (c, r) in snapshot.users.items()}
    window, cap = settings.dedup_window, DEDUP_MAX_IDS
    slot_covered = snapshot.covered
    if trimmed:  # each user from their checkpoint, plus the retained events after it
        start = {u: _recounted(state) for u, state in stored.items()}
        after_checkpoint = [
            (seq, second, [e for e in events if seq > slot_covered[slot_of(e.user)]]) for seq, second, events in log
        ]
        live_recount = recount(
            after_checkpoint,
            facets_of,
            window=window,
            cap=cap,
            start=start,
            cutoff=lambda u: live[slot_map.shard_of(u)][0],
        )
        stored_cmp = None
    else:
        live_recount = recount(log, facets_of, window=window, cap=cap, cutoff=lambda u: live[slot_map.shard_of(u)][0])
        stored_recount = recount(log, facets_of, window=window, cap=cap, cutoff=lambda u: slot_covered[slot_of(u)])
        stored_cmp = Comparison()
        for uxid in sorted(set(stored_recount) | set(stored)):
            stored_cmp.add(uxid, _expected(stored_recount.get(uxid)), stored.get(uxid))

    # Live: the users the shards hold in memory. (One the recount has but no shard holds is
    # compared as its checkpoint, above: it was evicted, so its checkpoint is its state.)
    live_cmp = Comparison()
    for _, users in live.values():
        for uxid, (counts, seen) in users.items():
            live_cmp.add(uxid, _expected(live_recount.get(uxid)), _state(counts, seen))
    events = sum(len(events) for _, _, events in log)
    mismatched = _popularity_mismatches(snapshot.popularity, stored)
    return Report(
        settings.stream,
        events,
        first,
        through,
        live_cmp,
        stored_cmp,
        mismatched,
        lagging,
        time.monotonic() - began,
        erased,
        len(redacted),
    )


def _popularity_mismatches(popularity: Popularity, stored: dict[str, State]) -> int:
    """Keys where global popularity differs from the sum of the checkpointed users' counts."""
    totals: dict[int, list[int]] = {}
    for rows, _ in stored.values():
        for key, clicks, impressions, _ in rows:
            total = totals.setdefault(key, [0, 0])
            total[0] += clicks
            total[1] += impressions
    table = {
        int(k): [int(c), int(i)]
        for k, c, i in zip(popularity.keys, popularity.clicks, popularity.impressions, strict=True)
        if c or i
    }
    totals = {k: v for k, v in totals.items() if v != [0, 0]}
    return sum(table.get(k) != totals.get(k) for k in set(table) | set(totals))


def _describe(state: State | None) -> str:
    if state is None or not state[0]:
        return "(no state)"
    rows = state[0]
    return f"{len(rows)} rows, {sum(r[1] for r in rows)} clicks, {sum(r[2] for r in rows)} seen"


def render(report: Report, as_json: bool) -> str:
    """The report as `mabrec verify` prints it."""
    if as_json:
        return orjson.dumps(report.as_dict(), option=orjson.OPT_INDENT_2).decode()
    checkpoints = report.checkpoints
    lines = [
        f"recounted {report.events} events of stream {report.stream} (#{report.since} to #{report.through})"
        f" in {report.seconds:.1f}s",
        f"live state:   {report.live.users} users checked, {report.live.mismatches} mismatches",
        f"checkpoints:  {checkpoints.users} users checked, {checkpoints.mismatches} mismatches"
        if checkpoints
        else f"checkpoints:  the baseline (retention trimmed the log before #{report.since})",
        f"popularity:   {report.popularity_mismatches} mismatches with the sum of the checkpoints",
        f"erasures:     {report.erased_users} users erased; {report.redacted_messages} messages recounted from"
        " their redacted copies",
        *(
            f"  {line}"
            for line in report.lagging + report.live.examples + (checkpoints.examples if checkpoints else [])
        ),
        "OK: every posterior equals the recount" if report.ok else "MISMATCH",
    ]
    return "\n".join(lines)
