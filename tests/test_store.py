"""PostgreSQL: migrations, catalog loading with COPY, checkpoints. Against a real server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

import numpy as np
import psycopg
import pytest
import pytest_asyncio
from psycopg_pool import AsyncConnectionPool

from system.core import userstate
from system.core.catalog import Movie
from system.core.catalog_file import read_movies
from system.core.errors import BadRequest, ConfigError
from system.core.sharding import SLOTS
from system.db.catalog_store import CatalogStore
from system.db.migrations import migrate
from system.db.pool import open_pool
from system.db.state_store import StateStore
from tests.conftest import SMALL_CSV, SMALL_JSONL

pytestmark = pytest.mark.integration


@pytest_asyncio.fixture
async def pool(database_url: str) -> AsyncIterator[AsyncConnectionPool]:
    await migrate(database_url)
    pool = await open_pool(database_url)
    yield pool
    await pool.close()


async def test_migrations_apply_once(database_url: str) -> None:
    assert await migrate(database_url) == [1, 2, 3]
    assert await migrate(database_url) == []
    with psycopg.connect(database_url) as conn:
        tables = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert {
        "movies",
        "facets",
        "movie_facets",
        "catalog_meta",
        "slots",
        "user_state",
        "event_log",
        "schema_migrations",
    } <= tables


async def test_load_and_read_catalog_with_directors(pool: AsyncConnectionPool) -> None:
    store = CatalogStore(pool)
    movies = list(read_movies(SMALL_CSV))
    result = await store.load(movies, source="small.csv")
    assert (result.movies, result.removed, result.version) == (40, 0, 1)
    catalog = await store.read()
    assert len(catalog) == 40 and catalog.version == 1
    matrix = catalog.facet_names(int(catalog.movie_index([14])[0]))
    assert [f.name for f in matrix["directors"]] == ["Lana Wachowski", "Lilly Wachowski"]
    assert [f.name for f in matrix["genres"]] == ["Action", "Sci-Fi"]
    assert catalog.movies[0].rating == 9.3  # exact, not a float32 artefact
    # Facet values are numbered in (kind, name) order: the same ids on every fresh database.
    assert [(f.kind, f.name) for f in catalog.facets] == sorted((f.kind, f.name) for f in catalog.facets)


async def test_reload_keeps_facet_ids_and_replace_or_merge(pool: AsyncConnectionPool) -> None:
    store = CatalogStore(pool)
    await store.load(list(read_movies(SMALL_CSV)), source="a")
    before = {(f.kind, f.name): f.id for f in (await store.read()).facets}
    result = await store.load(list(read_movies(SMALL_JSONL)), source="b", replace=False)
    assert result.removed == 0 and result.version == 2
    catalog = await store.read()
    assert len(catalog) == 43
    after = {(f.kind, f.name): f.id for f in catalog.facets}
    assert all(after[key] == fid for key, fid in before.items())
    assert ("actors", "Al Pacino") in after and ("keywords", "heist") in after
    result = await store.load(list(read_movies(SMALL_JSONL)), source="c")  # replace
    assert result.removed == 40 and len(await store.read()) == 3


async def test_a_bad_load_changes_nothing(pool: AsyncConnectionPool) -> None:
    store = CatalogStore(pool)
    await store.load(list(read_movies(SMALL_CSV)), source="a")
    with pytest.raises(BadRequest, match="duplicate movie ids"):
        await store.load([Movie(1, "One"), Movie(1, "Again")], source="bad")
    assert len(await store.read()) == 40 and await store.version() == 1


async def test_checkpoints_round_trip_atomically(pool: AsyncConnectionPool) -> None:
    store = StateStore(pool)
    slot_map = await store.ensure_slot_map(2)
    assert slot_map.shards == 2 and await store.ensure_slot_map(4) == slot_map  # first start decides
    mine = slot_map.slots_of(0)
    await store.save([("alice", mine[0], b"\x01\x00\x00\x00" * 3, b"")], mine, 17)
    await store.save([("alice", mine[0], b"\x02\x00\x00\x00" * 3, b"\x07" * 8)], mine, 12)  # never goes back
    assert set((await store.covered_by_slot(mine)).values()) == {17}
    assert await store.load_users(mine) == [("alice", b"\x02\x00\x00\x00" * 3, b"\x07" * 8)]
    assert await store.load_users(slot_map.slots_of(1)) == []
    assert set((await store.covered_by_slot(range(SLOTS))).values()) == {0, 17}


async def test_checkpoints_refer_to_one_event_stream(pool: AsyncConnectionPool) -> None:
    store = StateStore(pool)
    await store.ensure_slot_map(1)
    created = datetime(2026, 1, 1, tzinfo=UTC)
    await store.check_event_log("S_EVENTS", created, 0)
    await store.save([], list(range(SLOTS)), 50)
    await store.check_event_log("S_EVENTS", created, 60)
    with pytest.raises(ConfigError, match="reset or replaced"):
        await store.check_event_log("S_EVENTS", datetime(2026, 2, 1, tzinfo=UTC), 60)
    with pytest.raises(ConfigError, match="reset or replaced"):
        await store.check_event_log("S_EVENTS", created, 10)  # the stream is behind the checkpoints


async def test_checkpoints_from_before_the_since_column_load_with_it_zero(database_url: str) -> None:
    """Migration 003 widens stored rows (key, clicks, seen) to (key, clicks, seen, since)."""
    assert await migrate(database_url, through=2) == [1, 2]
    old = np.array([[-4, 1, 6], [9, 1, 2]], dtype="<i4").tobytes()
    with psycopg.connect(database_url) as conn:
        conn.execute("INSERT INTO user_state (uxid, slot, counts) VALUES ('old', 3, %s), ('none', 3, '')", (old,))
    assert await migrate(database_url) == [3]
    pool = await open_pool(database_url)
    try:
        rows = {u: userstate.from_bytes(c).tolist() for u, c, _ in await StateStore(pool).load_users([3])}
    finally:
        await pool.close()
    assert rows == {"old": [[-4, 1, 6, 0], [9, 1, 2, 0]], "none": []}
