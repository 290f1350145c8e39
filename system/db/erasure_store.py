"""Erasures in PostgreSQL (sql/006_erasure.sql): a user's checkpoint deleted with what it added
to popularity, the erasure recorded, and the redacted copies of the event-log messages that
named the user."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
from psycopg_pool import AsyncConnectionPool

from system.core import userstate
from system.core.popularity import Popularity
from system.db.state_store import Fenced, add_popularity


@dataclass(frozen=True)
class Erasure:
    id: int
    requested_at: datetime
    through_seq: int
    pending: bool
    messages: int
    dead_letters: int
    done_at: datetime | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "erasure": self.id,
            "requested_at": self.requested_at.isoformat(),
            "through_seq": self.through_seq,
            "log": "scrubbing" if self.pending else "scrubbed",
            "messages_redacted": self.messages,
            "dead_letters_deleted": self.dead_letters,
            "done_at": self.done_at.isoformat() if self.done_at else None,
        }


class ErasureStore:
    def __init__(self, pool: AsyncConnectionPool) -> None:
        self.pool = pool

    async def erase_user(
        self, uxid: str, slot: int, epoch: int, through: int, sent: list[bool] | None = None
    ) -> tuple[int, np.ndarray | None]:
        """Delete the user's checkpoint and take it out of popularity, and record the erasure
        (its log scrub pending), atomically; refused (Fenced) if the slot has a new owner.
        Returns the erasure's id and the checkpoint's rows (None: there was none). `sent` gets
        True once the transaction's body ran: a failure after that may have committed."""
        async with self.pool.connection() as conn, conn.transaction():
            row = await (await conn.execute("SELECT epoch FROM slots WHERE slot = %s FOR UPDATE", (slot,))).fetchone()
            if row is None or row[0] != epoch:
                raise Fenced(f"slot {slot} has a new owner")
            gone = await (
                await conn.execute("DELETE FROM user_state WHERE uxid = %s RETURNING counts", (uxid,))
            ).fetchone()
            counts = userstate.from_bytes(bytes(gone[0])) if gone else None
            if counts is not None:
                await add_popularity(conn, Popularity.of_user(counts).negated())
            created = await (
                await conn.execute(
                    "INSERT INTO erasures (through_seq, pending_uxid) VALUES (%s, %s) RETURNING id", (through, uxid)
                )
            ).fetchone()
            if sent is not None:
                sent.append(True)
        assert created is not None  # INSERT ... RETURNING always has its row
        return int(created[0]), counts

    async def pending(self) -> list[tuple[int, str, int]]:
        """(id, uxid, through_seq) of the erasures whose log scrub has not finished."""
        async with self.pool.connection() as conn:
            rows = await (
                await conn.execute(
                    "SELECT id, pending_uxid, through_seq FROM erasures WHERE pending_uxid IS NOT NULL ORDER BY id"
                )
            ).fetchall()
        return [(int(i), str(u), int(t)) for i, u, t in rows]

    async def keep_redacted(self, erasure: int, seq: int, second: int, data: bytes) -> None:
        """Keep a redacted copy of message `seq` (before the stream's copy is deleted)."""
        async with self.pool.connection() as conn:
            await conn.execute(
                "INSERT INTO redacted_messages (seq, second, data, erasure) VALUES (%s, %s, %s, %s)"
                " ON CONFLICT (seq) DO UPDATE SET data = EXCLUDED.data, erasure = EXCLUDED.erasure",
                (seq, second, data, erasure),
            )

    async def redacted(self, after: int = 0, through: int | None = None) -> list[tuple[int, int, bytes]]:
        """(seq, second, data) of the redacted messages with after < seq <= through, in order."""
        async with self.pool.connection() as conn:
            rows = await (
                await conn.execute(
                    "SELECT seq, second, data FROM redacted_messages"
                    " WHERE seq > %s AND (%s::bigint IS NULL OR seq <= %s) ORDER BY seq",
                    (after, through, through),
                )
            ).fetchall()
        return [(int(s), int(t), bytes(d)) for s, t, d in rows]

    async def finish(self, erasure: int, messages: int, dead_letters: int) -> None:
        """The scrub is done: the erasure forgets whom it was for."""
        async with self.pool.connection() as conn:
            await conn.execute(
                "UPDATE erasures SET pending_uxid = NULL, done_at = now(), messages = %s, dead_letters = %s"
                " WHERE id = %s",
                (messages, dead_letters, erasure),
            )

    async def count(self) -> int:
        """How many erasures there have been."""
        async with self.pool.connection() as conn:
            row = await (await conn.execute("SELECT count(*) FROM erasures")).fetchone()
        return int(row[0]) if row else 0

    async def erasures(self, limit: int = 100) -> list[Erasure]:
        """The latest erasures, newest first (never whom they were for)."""
        async with self.pool.connection() as conn:
            rows = await (
                await conn.execute(
                    "SELECT id, requested_at, through_seq, pending_uxid IS NOT NULL, messages, dead_letters, done_at"
                    " FROM erasures ORDER BY id DESC LIMIT %s",
                    (limit,),
                )
            ).fetchall()
        return [Erasure(*row) for row in rows]
