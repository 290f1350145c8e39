"""PostgreSQL repositories: the catalog, and the checkpointed bandit state with the slot map."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

import numpy as np
from psycopg_pool import AsyncConnectionPool

from system.catalog import Catalog, Facet, Movie
from system.errors import BadRequest, ConfigError
from system.settings import SLOTS
from system.sharding import SlotMap

MOVIE_COLUMNS = ("id", "name", "description", "rating", "votes", "duration", "duration_unit", "link", "imdb_id")


@dataclass(frozen=True)
class LoadResult:
    movies: int
    facets: int
    removed: int
    version: int


class CatalogStore:
    def __init__(self, pool: AsyncConnectionPool) -> None:
        self.pool = pool

    async def version(self) -> int:
        async with self.pool.connection() as conn:
            row = await (await conn.execute("SELECT version FROM catalog_meta")).fetchone()
        return row[0] if row else 0

    async def load(
        self,
        movies: Sequence[Movie],
        *,
        source: str,
        replace: bool = True,
        progress: Callable[[int], None] | None = None,
    ) -> LoadResult:
        """Load movies with COPY in one transaction. `replace` removes movies not in `movies`.
        Learned state survives: it refers to movie and facet ids, which a reload keeps."""
        async with self.pool.connection() as conn, conn.transaction():
            await conn.execute("CREATE TEMP TABLE new_movies (LIKE movies) ON COMMIT DROP")
            await conn.execute(
                "CREATE TEMP TABLE new_links (movie_id integer, kind text, name text, position smallint) ON COMMIT DROP"
            )
            cur = conn.cursor()
            async with cur.copy(f"COPY new_movies ({', '.join(MOVIE_COLUMNS)}) FROM STDIN") as copy:
                for n, m in enumerate(movies, start=1):
                    await copy.write_row(
                        (m.id, m.name, m.description, m.rating, m.votes, m.duration, m.duration_unit, m.link, m.imdb_id)
                    )
                    if progress and n % 500 == 0:
                        progress(500)
            if progress:
                progress(len(movies) % 500)
            async with cur.copy("COPY new_links (movie_id, kind, name, position) FROM STDIN") as copy:
                for m in movies:
                    for kind, names in m.facets.items():
                        for position, name in enumerate(names):
                            await copy.write_row((m.id, kind, name, position))
            dup = await (
                await conn.execute("SELECT id FROM new_movies GROUP BY id HAVING count(*) > 1 LIMIT 5")
            ).fetchall()
            if dup:
                raise BadRequest(f"duplicate movie ids in the file: {', '.join(str(r[0]) for r in dup)}")
            await conn.execute(
                "INSERT INTO facets (kind, name) SELECT DISTINCT kind, name FROM new_links ON CONFLICT DO NOTHING"
            )
            updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in MOVIE_COLUMNS[1:])
            await conn.execute(f"INSERT INTO movies SELECT * FROM new_movies ON CONFLICT (id) DO UPDATE SET {updates}")
            removed = 0
            if replace:
                cur = await conn.execute("DELETE FROM movies WHERE id NOT IN (SELECT id FROM new_movies)")
                removed = cur.rowcount
            await conn.execute("DELETE FROM movie_facets WHERE movie_id IN (SELECT id FROM new_movies)")
            await conn.execute(
                "INSERT INTO movie_facets (movie_id, facet_id, position)"
                " SELECT DISTINCT ON (l.movie_id, f.id) l.movie_id, f.id, l.position"
                " FROM new_links l JOIN facets f USING (kind, name) ORDER BY l.movie_id, f.id, l.position"
            )
            row = await (
                await conn.execute(
                    "INSERT INTO catalog_meta (version, source) VALUES (1, %s)"
                    " ON CONFLICT (singleton) DO UPDATE"
                    " SET version = catalog_meta.version + 1, source = EXCLUDED.source, loaded_at = now()"
                    " RETURNING version",
                    (source,),
                )
            ).fetchone()
            facets = await (await conn.execute("SELECT count(*) FROM facets")).fetchone()
        return LoadResult(movies=len(movies), facets=facets[0], removed=removed, version=row[0])

    async def read(self) -> Catalog:
        async with self.pool.connection() as conn, conn.transaction():
            meta = await (await conn.execute("SELECT version FROM catalog_meta")).fetchone()
            rows = await (await conn.execute(f"SELECT {', '.join(MOVIE_COLUMNS)} FROM movies ORDER BY id")).fetchall()
            facets = await (await conn.execute("SELECT id, kind, name FROM facets ORDER BY id")).fetchall()
            links = await (await conn.execute("SELECT movie_id, facet_id, position FROM movie_facets")).fetchall()
        movies = [Movie(*row) for row in rows]
        # Building the arrays takes tens of milliseconds for 10k movies: keep it off the event loop.
        return await asyncio.to_thread(Catalog, movies, [Facet(*f) for f in facets], links, meta[0] if meta else 0)


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
        if row[0] != stream or abs((row[1] - created).total_seconds()) > 1e-3 or top[0] > last_seq:
            raise ConfigError(
                f"the checkpoints in this database cover events of stream {row[0]} created {row[1]:%Y-%m-%d %H:%M:%S}"
                f" through #{top[0]}, but stream {stream} (created {created:%Y-%m-%d %H:%M:%S}) ends at #{last_seq}:"
                " the event log was reset or replaced. Point DATABASE_URL and NATS_URL at matching services"
                " (or start from an empty database)."
            )
