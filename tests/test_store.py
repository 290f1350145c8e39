"""PostgreSQL: migrations, catalog loading with COPY, checkpoints. Against a real server."""

from __future__ import annotations

import asyncio
import os
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
from system.core.dedup import SeenIds
from system.core.errors import BadRequest, ConfigError
from system.core.popularity import Popularity
from system.core.sharding import SLOTS
from system.db.catalog_store import CatalogStore
from system.db.migrations import migrate
from system.db.pool import open_pool, short_lived_pool
from system.db.state_store import Checkpoint, Fenced, StateStore
from tests.conftest import SMALL_CSV, SMALL_JSONL
from tests.pipeline import covered_by_slot

pytestmark = pytest.mark.integration


@pytest_asyncio.fixture
async def pool(database_url: str) -> AsyncIterator[AsyncConnectionPool]:
    await migrate(database_url)
    pool = await open_pool(database_url)
    yield pool
    await pool.close()


async def test_migrations_apply_once(database_url: str) -> None:
    assert await migrate(database_url) == [1, 2, 3, 4, 5, 6, 7]
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
        "popularity",
        "deployment",
        "checkpoint_writers",
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


def counts(*rows: tuple[int, int, int, int]) -> bytes:
    return np.array(rows, dtype="<i4").reshape(-1, 4).tobytes()


def popularity(*rows: tuple[int, int, int]) -> Popularity:
    table = np.array(rows, dtype=np.int64).reshape(-1, 3)
    return Popularity(table[:, 0], table[:, 1], table[:, 2])


async def test_checkpoints_round_trip_atomically(pool: AsyncConnectionPool) -> None:
    store = StateStore(pool)
    slot_map = await store.ensure_slot_map(2)
    assert slot_map.shards == 2 and await store.ensure_slot_map(4) == slot_map  # first start decides
    claims = await store.take_slots(0)
    mine = slot_map.slots_of(0)
    assert sorted(claims) == mine and {c.covered for c in claims.values()} == {0}
    epochs = {slot: claim.epoch for slot, claim in claims.items()}
    first = counts((-3, 1, 0, 0), (7, 1, 0, 0))
    await store.save(Checkpoint([("alice", mine[0], first, b"")], popularity((-3, 1, 0), (7, 1, 0)), epochs, 17))
    second = counts((-3, 1, 1, 1), (7, 1, 1, 1))
    seen = b"\x07" * 8 + b"\x01\x00\x00\x00"
    await store.save(Checkpoint([("alice", mine[0], second, seen)], popularity((-3, 0, 1), (7, 0, 1)), epochs, 12))
    assert set((await covered_by_slot(pool, mine)).values()) == {17}  # never goes back
    assert await store.load_users(["alice", "nobody"]) == [("alice", second, seen)]
    assert set((await covered_by_slot(pool, range(SLOTS))).values()) == {0, 17}
    total = await store.popularity()
    assert (total.keys.tolist(), total.clicks.tolist(), total.impressions.tolist()) == ([-3, 7], [1, 1], [1, 1])
    snapshot = await store.snapshot()
    assert snapshot.users == {"alice": (second, seen)} and snapshot.covered[mine[0]] == 17


async def test_a_checkpoint_from_an_owner_that_was_replaced_is_refused_whole(pool: AsyncConnectionPool) -> None:
    store = StateStore(pool)
    await store.ensure_slot_map(1)
    old = {slot: claim.epoch for slot, claim in (await store.take_slots(0)).items()}
    await store.save(Checkpoint([("bob", 5, counts((1, 1, 0, 0)), b"")], popularity((1, 1, 0)), old, 3))
    new = {slot: claim.epoch for slot, claim in (await store.take_slots(0)).items()}  # a successor
    assert all(new[slot] == old[slot] + 1 for slot in old)
    with pytest.raises(Fenced):
        await store.save(Checkpoint([("bob", 5, counts((1, 9, 9, 9)), b"")], popularity((1, 9, 9)), old, 99))
    assert await store.load_users(["bob"]) == [("bob", counts((1, 1, 0, 0)), b"")]  # nothing of it landed
    assert (await store.popularity()).clicks.tolist() == [1] and await store.oldest_checkpoint() == 3
    await store.save(Checkpoint([], popularity(), new, 4))  # the successor's are taken
    assert await store.oldest_checkpoint() == 4


async def test_checkpoints_refer_to_one_event_stream(pool: AsyncConnectionPool) -> None:
    store = StateStore(pool)
    await store.ensure_slot_map(1)
    created = datetime(2026, 1, 1, tzinfo=UTC)
    await store.check_event_log("S_EVENTS", created, 0)
    epochs = {slot: claim.epoch for slot, claim in (await store.take_slots(0)).items()}
    await store.save(Checkpoint([], popularity(), epochs, 50))
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
    assert await migrate(database_url) == [3, 4, 5, 6, 7]
    pool = await open_pool(database_url)
    try:
        rows = {u: userstate.from_bytes(c).tolist() for u, c, _ in await StateStore(pool).load_users(["old", "none"])}
    finally:
        await pool.close()
    assert rows == {"old": [[-4, 1, 6, 0], [9, 1, 2, 0]], "none": []}


async def test_migration_4_sums_popularity_and_dates_the_seen_ids(database_url: str) -> None:
    """Existing users' counts make the popularity table; their last event ids, kept from before
    (8-byte hashes), become (hash, stream second) pairs dated at the upgrade."""
    assert await migrate(database_url, through=3) == [1, 2, 3]
    ids = np.array([11, 2**62 + 5], dtype="<u8").tobytes()
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "INSERT INTO user_state (uxid, slot, counts, recent_ids) VALUES ('a', 1, %s, %s), ('b', 2, %s, '')",
            (counts((-2_000_000, 3, 40, 0), (7, 1, 2, 1)), ids, counts((7, 2_000_000_000, 5, 5))),
        )
    before = datetime.now(UTC).timestamp()
    assert await migrate(database_url) == [4, 5, 6, 7]
    pool = await open_pool(database_url)
    try:
        store = StateStore(pool)
        total = await store.popularity()
        users = dict((u, r) for u, _, r in await store.load_users(["a", "b"]))
    finally:
        await pool.close()
    assert total.keys.tolist() == [-2_000_000, 7]
    assert total.clicks.tolist() == [3, 2_000_000_001] and total.impressions.tolist() == [40, 7]
    seen = SeenIds.from_bytes(users["a"])
    assert list(seen.ids) == [11, 2**62 + 5] and all(before - 5 <= t <= before + 5 for t in seen.at)
    assert users["b"] == b""


async def test_a_pooled_connection_the_server_dropped_is_replaced_without_an_error(pool: AsyncConnectionPool) -> None:
    """The pool checks a connection with a round trip only when the server spoke while it sat
    idle (system/db/pool.py): a terminated backend says goodbye, and the next checkout gets a
    live connection instead of the dead one."""
    async with pool.connection() as conn:
        dead = (await (await conn.execute("SELECT pg_backend_pid()")).fetchone() or (0,))[0]
    async with await psycopg.AsyncConnection.connect(str(pool.conninfo), autocommit=True) as admin:
        await admin.execute("SELECT pg_terminate_backend(%s)", (dead,))
        # Until its goodbye has reached the client's socket: the backend is gone from the server.
        while (
            await (await admin.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (dead,))).fetchone()
            or (1,)
        )[0]:
            await asyncio.sleep(0.01)
    for _ in range(3):  # every checkout works; none gets the dead connection
        async with pool.connection() as conn:
            pid = (await (await conn.execute("SELECT pg_backend_pid()")).fetchone() or (0,))[0]
        assert pid != dead


async def test_an_idle_connection_past_descriptor_1024_is_checked_and_replaced_when_dead(database_url: str) -> None:
    """The pool's idle check looked at the socket with select(), which raises for descriptors
    >= 1024: a busy process (a Ray worker) gets there. With 1,100 descriptors open first, the
    pool's connection is past it; the check still works, and a connection the server ended
    while it sat idle is replaced, not handed out."""
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1_100)]
    try:
        async with short_lived_pool(database_url, "fd-test") as pool:
            async with pool.connection() as conn:
                assert conn.fileno() >= 1024
                first = (await (await conn.execute("SELECT pg_backend_pid()")).fetchone() or [0])[0]
            async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as other:
                await other.execute("SELECT pg_terminate_backend(%s)", (first,))
                for _ in range(500):  # until the backend is gone: its goodbye is on our socket
                    gone = await (
                        await other.execute("SELECT NOT EXISTS (SELECT FROM pg_stat_activity WHERE pid = %s)", (first,))
                    ).fetchone()
                    if gone and gone[0]:
                        break
                    await asyncio.sleep(0.01)
            async with pool.connection() as conn:  # the check saw the goodbye: a new connection
                second = (await (await conn.execute("SELECT pg_backend_pid()")).fetchone() or [0])[0]
            assert second not in (0, first)
    finally:
        for fd in held:
            os.close(fd)
