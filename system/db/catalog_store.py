"""The catalog in PostgreSQL: loading a file with COPY, reading it back as arrays."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from psycopg_pool import AsyncConnectionPool

from system.core.catalog import Catalog, Facet, Movie
from system.core.catalog_file import read_movies
from system.core.errors import BadRequest

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
                "INSERT INTO facets (kind, name) SELECT DISTINCT kind, name FROM new_links ORDER BY kind, name"
                " ON CONFLICT DO NOTHING"
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
        assert row is not None and facets is not None  # RETURNING and count(*) always give a row
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


async def load_file(store: CatalogStore, path: Path, *, replace: bool = True) -> LoadResult:
    """Parse a catalog file (in a thread) and load it, with a progress bar on a terminal."""
    from tqdm import tqdm

    movies = await asyncio.to_thread(lambda: list(read_movies(path)))
    with tqdm(total=len(movies), unit="movie", desc=f"loading {path.name}", disable=not sys.stderr.isatty()) as bar:
        return await store.load(movies, source=str(path), replace=replace, progress=bar.update)
