"""The bandit state in PostgreSQL: the slot map, checkpoints of users, and the event log they cover."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime

import numpy as np
from psycopg_pool import AsyncConnectionPool

from system.core.errors import ConfigError
from system.core.sharding import SLOTS, SlotMap


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
        return await self.slot_map()

    async def slot_map(self) -> SlotMap:
        async with self.pool.connection() as conn:
            rows = await (await conn.execute("SELECT slot, shard FROM slots ORDER BY slot")).fetchall()
        if len(rows) != SLOTS:
            raise ConfigError(f"the slots table has {len(rows)} rows, expected {SLOTS}")
        return SlotMap(np.array([r[1] for r in rows], dtype=np.int16))

    async def assign_slots(self, owners: SlotMap) -> None:
        async with self.pool.connection() as conn:
            await conn.execute(
                "UPDATE slots SET shard = u.shard FROM unnest(%s::int2[], %s::int2[]) AS u(slot, shard)"
                " WHERE slots.slot = u.slot",
                (list(range(SLOTS)), owners.owners.tolist()),
            )

    async def covered_by_slot(self, slots: Iterable[int]) -> dict[int, int]:
        """Per slot, the event sequence its checkpoint covers."""
        async with self.pool.connection() as conn:
            rows = await (
                await conn.execute("SELECT slot, covered_seq FROM slots WHERE slot = ANY(%s)", (list(slots),))
            ).fetchall()
        return {int(slot): int(covered) for slot, covered in rows}

    async def load_users(self, slots: Iterable[int]) -> list[tuple[str, bytes, bytes]]:
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT uxid, counts, recent_ids FROM user_state WHERE slot = ANY(%s)", (list(slots),)
            )
            return [(u, bytes(c), bytes(r)) for u, c, r in await cur.fetchall()]

    async def save(self, users: Sequence[tuple[str, int, bytes, bytes]], slots: Sequence[int], covered: int) -> None:
        """One checkpoint, atomically: the changed users and the sequence the slots now cover."""
        async with self.pool.connection() as conn, conn.transaction():
            if users:
                uxids, user_slots, counts, recent = zip(*users, strict=False)
                await conn.execute(
                    "INSERT INTO user_state (uxid, slot, counts, recent_ids)"
                    " SELECT * FROM unnest(%s::text[], %s::int2[], %s::bytea[], %s::bytea[])"
                    " ON CONFLICT (uxid) DO UPDATE SET slot = EXCLUDED.slot, counts = EXCLUDED.counts,"
                    " recent_ids = EXCLUDED.recent_ids, updated_at = now()",
                    (list(uxids), list(user_slots), list(counts), list(recent)),
                )
            await conn.execute(
                "UPDATE slots SET covered_seq = %s WHERE slot = ANY(%s) AND covered_seq < %s",
                (covered, list(slots), covered),
            )

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
