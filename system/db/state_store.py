"""The bandit state in PostgreSQL: the slot map, checkpoints of users, and the event log they cover."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
from psycopg import AsyncConnection, IsolationLevel
from psycopg_pool import AsyncConnectionPool

from system.core.errors import ConfigError, ServiceError
from system.core.popularity import Popularity
from system.core.sharding import SLOTS, SlotMap


async def _copy_users(conn: AsyncConnection[Any], users: Sequence[tuple[str, int, bytes, bytes]]) -> None:
    """The users of a checkpoint into this session's staging table, by binary COPY: a tenth of
    the shard's CPU an INSERT of unnest()ed arrays costs, with the event loop free meanwhile
    (BENCHMARKS.md has the numbers). The caller's transaction empties the table when it ends."""
    await conn.execute(
        "SET LOCAL client_min_messages = warning;"  # no notice that the table exists, every time
        " CREATE TEMP TABLE IF NOT EXISTS user_state_in"
        " (uxid text, slot int2, counts bytea, recent_ids bytea) ON COMMIT DELETE ROWS"
    )
    async with conn.cursor().copy("COPY user_state_in FROM STDIN (FORMAT BINARY)") as copy:
        copy.set_types(["text", "int2", "bytea", "bytea"])
        for row in users:
            await copy.write_row(row)


class Fenced(ServiceError):
    """A write from a shard that no longer owns its slots: a successor took them over."""

    status = 409
    code = "fenced"


@dataclass(frozen=True)
class Claim:
    """A slot as its owner took it: the sequence its checkpoint covers, and the owner's epoch."""

    covered: int
    epoch: int


@dataclass(frozen=True)
class Writer:
    """Who writes a checkpoint: a shard's process, and the checkpoint's number within it."""

    shard: int
    instance: str  # a uuid per process
    number: int


@dataclass
class Checkpoint:
    users: Sequence[tuple[str, int, bytes, bytes]]  # (uxid, slot, counts, de-duplication ids)
    popularity: Popularity  # what the events since the last checkpoint add
    epochs: dict[int, int]  # slot -> the epoch its owner took it with
    covered: int
    writer: Writer | None = None
    # Earlier checkpoints of this writer whose COMMIT went unanswered, (number, popularity): each
    # adds its popularity now unless the writer's row says it landed.
    in_doubt: Sequence[tuple[int, Popularity]] = ()
    # Set once the transaction's body ran: if it fails after this, the COMMIT may have landed.
    sent: bool = False


@dataclass(frozen=True)
class Deployment:
    """What the deployment should be (written by `mabrec scale` / `mabrec restart`, the admin
    API) and where a change stands (written by the supervisor)."""

    desired_shards: int | None
    restart_requested: int
    restart_done: int
    routing_paused: bool
    map_generation: int


@dataclass(frozen=True)
class Snapshot:
    covered: dict[int, int]  # slot -> the sequence its checkpoint covers
    users: dict[str, tuple[bytes, bytes]]  # uxid -> (counts, seen ids)
    popularity: Popularity


async def add_popularity(conn: AsyncConnection[Any], delta: Popularity) -> None:
    if len(delta.keys):
        # In key order: concurrent checkpoints of other shards lock the same rows in the same
        # order, so they wait for each other instead of deadlocking.
        await conn.execute(
            "INSERT INTO popularity AS p (key, clicks, impressions)"
            " SELECT * FROM unnest(%s::int4[], %s::int8[], %s::int8[]) ORDER BY 1"
            " ON CONFLICT (key) DO UPDATE"
            " SET clicks = p.clicks + EXCLUDED.clicks, impressions = p.impressions + EXCLUDED.impressions",
            (delta.keys.tolist(), delta.clicks.tolist(), delta.impressions.tolist()),
        )


async def _popularity(conn: AsyncConnection[Any]) -> Popularity:
    rows = await (await conn.execute("SELECT key, clicks, impressions FROM popularity ORDER BY key")).fetchall()
    table = np.array(rows, dtype=np.int64).reshape(-1, 3)
    return Popularity(table[:, 0], table[:, 1], table[:, 2])


async def _add_in_doubt(conn: AsyncConnection[Any], writer: Writer, in_doubt: Sequence[tuple[int, Popularity]]) -> None:
    """Add the popularity of the writer's unanswered checkpoints that did not land, and record
    this one as its last: a checkpoint landed iff its number is at most the row's."""
    if in_doubt:
        row = await (
            await conn.execute("SELECT instance, cut FROM checkpoint_writers WHERE shard = %s", (writer.shard,))
        ).fetchone()
        landed = row[1] if row is not None and str(row[0]) == writer.instance else -1
        lost = [popularity for number, popularity in in_doubt if number > landed]
        if lost:
            await add_popularity(conn, Popularity.total(lost))
    await conn.execute(
        "INSERT INTO checkpoint_writers (shard, instance, cut) VALUES (%s, %s, %s)"
        " ON CONFLICT (shard) DO UPDATE SET instance = EXCLUDED.instance, cut = EXCLUDED.cut",
        (writer.shard, writer.instance, writer.number),
    )


class StateStore:
    def __init__(self, pool: AsyncConnectionPool) -> None:
        self.pool = pool

    async def ensure_slot_map(self, shards: int) -> SlotMap:
        """The stored slot map; on first start, an even one over `shards` shards."""
        even = SlotMap.even(shards)
        async with self.pool.connection() as conn:
            await conn.execute(
                "INSERT INTO slots (slot, shard) SELECT * FROM unnest(%s::int2[], %s::int2[]) ON CONFLICT DO NOTHING",
                (list(range(SLOTS)), even.owners.tolist()),
            )
            await conn.execute("UPDATE deployment SET desired_shards = %s WHERE desired_shards IS NULL", (shards,))
        return await self.slot_map()

    async def slot_map(self) -> SlotMap:
        async with self.pool.connection() as conn:
            rows = await (await conn.execute("SELECT slot, shard FROM slots ORDER BY slot")).fetchall()
        if len(rows) != SLOTS:
            raise ConfigError(f"the slots table has {len(rows)} rows, expected {SLOTS}")
        return SlotMap(np.array([r[1] for r in rows], dtype=np.int16))

    async def deployment(self) -> Deployment:
        async with self.pool.connection() as conn:
            row = await (
                await conn.execute(
                    "SELECT desired_shards, restart_requested, restart_done, routing_paused, map_generation"
                    " FROM deployment"
                )
            ).fetchone()
        assert row is not None  # migration 005 inserted it
        return Deployment(*row)

    async def set_desired_shards(self, shards: int) -> None:
        async with self.pool.connection() as conn:
            await conn.execute("UPDATE deployment SET desired_shards = %s", (shards,))

    async def cancel_changes(self, shards: int) -> None:
        """No change wanted any more: `shards` shards (the map's), no rolling restart pending."""
        async with self.pool.connection() as conn:
            await conn.execute("UPDATE deployment SET desired_shards = %s, restart_done = restart_requested", (shards,))

    async def request_restart(self) -> int:
        """Ask for a rolling restart of every shard; the number it will be known by."""
        async with self.pool.connection() as conn:
            row = await (
                await conn.execute(
                    "UPDATE deployment SET restart_requested = restart_requested + 1 RETURNING restart_requested"
                )
            ).fetchone()
        assert row is not None
        return int(row[0])

    async def restart_finished(self, request: int) -> None:
        async with self.pool.connection() as conn:
            await conn.execute("UPDATE deployment SET restart_done = %s WHERE restart_done < %s", (request, request))

    async def pause_routing(self, paused: bool) -> None:
        """Hold the event router still (a move in progress) or let it go; it outlives restarts."""
        async with self.pool.connection() as conn:
            await conn.execute("UPDATE deployment SET routing_paused = %s", (paused,))

    async def move_slots(self, moves: dict[int, int]) -> None:
        """Give each slot (key) to its new shard (value). The new owner takes it (a new epoch)
        when it acquires it; the old one has released it, with its final checkpoint."""
        async with self.pool.connection() as conn, conn.transaction():
            await conn.execute(
                "UPDATE slots SET shard = m.shard FROM unnest(%s::int2[], %s::int2[]) AS m(slot, shard)"
                " WHERE slots.slot = m.slot",
                (list(moves), list(moves.values())),
            )
            await conn.execute("UPDATE deployment SET map_generation = map_generation + 1")

    async def assign_slots(self, owners: SlotMap) -> None:
        """A new slot map (an offline re-shard). Every slot that changes hands gets a new epoch,
        so a shard of the old layout that still runs can no longer checkpoint it."""
        async with self.pool.connection() as conn, conn.transaction():
            await conn.execute(
                "UPDATE slots SET shard = u.shard, epoch = epoch + 1 FROM unnest(%s::int2[], %s::int2[]) AS u(slot, shard)"
                " WHERE slots.slot = u.slot AND slots.shard <> u.shard",
                (list(range(SLOTS)), owners.owners.tolist()),
            )
            await conn.execute(
                "UPDATE deployment SET map_generation = map_generation + 1, desired_shards = %s", (owners.shards,)
            )

    async def take_slots(self, shard: int, slots: Sequence[int] | None = None) -> dict[int, Claim]:
        """Take ownership of the shard's slots (all of them, or these, which the map must give
        it): each slot's epoch goes up by one, in the same statement that reads the position its
        checkpoint covers. From then on a checkpoint carrying an older epoch (a previous owner
        that is still alive) is refused."""
        chosen = None if slots is None else list(slots)
        async with self.pool.connection() as conn:
            rows = await (
                await conn.execute(
                    "UPDATE slots SET epoch = epoch + 1 WHERE shard = %s AND (%s::int2[] IS NULL OR slot = ANY(%s))"
                    " RETURNING slot, covered_seq, epoch",
                    (shard, chosen, chosen),
                )
            ).fetchall()
        return {int(slot): Claim(int(covered), int(epoch)) for slot, covered, epoch in rows}

    async def oldest_checkpoint(self) -> int:
        """The lowest sequence any slot's checkpoint covers: where a replay of everything starts."""
        async with self.pool.connection() as conn:
            row = await (await conn.execute("SELECT coalesce(min(covered_seq), 0) FROM slots")).fetchone()
        assert row is not None  # an aggregate always has a row
        return int(row[0])

    async def checkpointed_users(self, slots: Sequence[int]) -> list[str]:
        """The ids of the users of these slots that have a checkpoint."""
        async with self.pool.connection() as conn:
            cursor = await conn.execute("SELECT uxid FROM user_state WHERE slot = ANY(%s)", (list(slots),))
            return [uxid for (uxid,) in await cursor.fetchall()]

    async def load_users(self, uxids: Sequence[str]) -> list[tuple[str, bytes, bytes]]:
        """The checkpointed state of these users (those that have one): one indexed read."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT uxid, counts, recent_ids FROM user_state WHERE uxid = ANY(%s)", (list(uxids),)
            )
            return [(u, bytes(c), bytes(r)) for u, c, r in await cur.fetchall()]

    async def snapshot(self) -> Snapshot:
        """Every checkpoint, as of one moment (for `mabrec verify`): the slots' positions, every
        user, and popularity, in one repeatable-read transaction."""
        async with self.pool.connection() as conn:
            await conn.set_isolation_level(IsolationLevel.REPEATABLE_READ)
            try:
                async with conn.transaction():
                    slots = await (await conn.execute("SELECT slot, covered_seq FROM slots")).fetchall()
                    users = await (await conn.execute("SELECT uxid, counts, recent_ids FROM user_state")).fetchall()
                    popularity = await _popularity(conn)
            finally:
                await conn.set_isolation_level(None)
        return Snapshot({int(s): int(c) for s, c in slots}, {u: (bytes(c), bytes(r)) for u, c, r in users}, popularity)

    async def popularity(self) -> Popularity:
        """Every user's clicks and impressions per movie and facet value (keys as in user state)."""
        async with self.pool.connection() as conn:
            return await _popularity(conn)

    async def save(self, checkpoint: Checkpoint) -> None:
        """One checkpoint, atomically: the changed users, what they add to popularity, and the
        sequence the slots now cover. Refused (Fenced) if another owner took any of the slots."""
        async with self.pool.connection() as conn, conn.transaction():
            claimed = checkpoint.epochs
            rows = await (
                await conn.execute("SELECT slot, epoch FROM slots WHERE slot = ANY(%s) FOR UPDATE", (sorted(claimed),))
            ).fetchall()
            lost = sorted(int(slot) for slot, epoch in rows if epoch != claimed[int(slot)])
            if lost or len(rows) != len(claimed):
                raise Fenced(f"{len(lost)} of its slots have a new owner (slot {lost[0] if lost else '?'} ...)")
            if checkpoint.users:
                await _copy_users(conn, checkpoint.users)
                await conn.execute(
                    "INSERT INTO user_state (uxid, slot, counts, recent_ids) SELECT * FROM user_state_in"
                    " ON CONFLICT (uxid) DO UPDATE SET slot = EXCLUDED.slot, counts = EXCLUDED.counts,"
                    " recent_ids = EXCLUDED.recent_ids, updated_at = now()"
                )
            await add_popularity(conn, checkpoint.popularity)
            if checkpoint.writer is not None:
                await _add_in_doubt(conn, checkpoint.writer, checkpoint.in_doubt)
            await conn.execute(
                "UPDATE slots SET covered_seq = %s WHERE slot = ANY(%s) AND covered_seq < %s",
                (checkpoint.covered, sorted(claimed), checkpoint.covered),
            )
            checkpoint.sent = True

    async def check_event_log(self, stream: str, created: datetime, last_seq: int) -> None:
        """Refuse to run on checkpoints that refer to another event stream than this one: they
        would skip (or double) events. Records the stream on first use."""
        async with self.pool.connection() as conn:
            await conn.execute(
                "INSERT INTO event_log (stream, created) VALUES (%s, %s) ON CONFLICT DO NOTHING", (stream, created)
            )
            row = await (await conn.execute("SELECT stream, created FROM event_log")).fetchone()
            top = await (await conn.execute("SELECT coalesce(max(covered_seq), 0) FROM slots")).fetchone()
        assert row is not None and top is not None  # inserted above; an aggregate always has a row
        if row[0] != stream or abs((row[1] - created).total_seconds()) > 1e-3 or top[0] > last_seq:
            raise ConfigError(
                f"the checkpoints in this database cover events of stream {row[0]} created {row[1]:%Y-%m-%d %H:%M:%S}"
                f" through #{top[0]}, but stream {stream} (created {created:%Y-%m-%d %H:%M:%S}) ends at #{last_seq}:"
                " the event log was reset or replaced. Point DATABASE_URL and NATS_URL at matching services"
                " (or start from an empty database)."
            )
