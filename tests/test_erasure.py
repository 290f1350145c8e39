"""Erasing a user, without Ray: plain Shard and EventRouter objects against real PostgreSQL and
NATS JetStream, so the test can look into every place the id could be: each shard's memory,
every table, the event stream and the dead letters. (test_e2e erases over HTTP and the CLI.)"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import orjson
import psycopg
import pytest
import pytest_asyncio
from nats.js import JetStreamContext

from actors.shard import Shard
from system.bus import stream
from system.core.settings import Settings
from system.db.erasure_store import ErasureStore
from system.db.pool import short_lived_pool
from system.verify import verify
from tests.pipeline import Pipeline, next_commit_unanswered, restored, start_pipeline, stop_pipeline, wait_for

pytestmark = pytest.mark.integration

GONE = "zoë-erase-me"  # not ASCII: producers may escape it (\u00eb) in their JSON
KEEP = "keep-me"


@pytest_asyncio.fixture
async def pipeline(settings: Settings, js: JetStreamContext) -> AsyncIterator[Pipeline]:
    running = await start_pipeline(settings, js)
    yield running
    await stop_pipeline(running)


async def everything_in_the_streams(pipeline: Pipeline) -> list[bytes]:
    settings, js = pipeline.settings, pipeline.js
    found = []
    for name in (settings.stream, settings.deadletter_stream):
        last = await stream.last_seq(js, name)
        async for batch in stream.read_range(js, settings, 0, last, name=name):
            found += [m.data for m in batch]
    return found


def rows_naming(database_url: str, needle: str) -> dict[str, int]:
    """Every table's rows whose text form holds the id, as text or as the hex of its UTF-8."""
    hexed = needle.encode().hex()
    with psycopg.connect(database_url) as conn:
        tables = [t for (t,) in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
        counts = {}
        for table in tables:
            row = conn.execute(
                f'SELECT count(*) FROM "{table}" t WHERE t::text LIKE %s OR t::text LIKE %s',  # noqa: S608 - catalog names
                (f"%{needle}%", f"%{hexed}%"),
            ).fetchone()
            assert row is not None
            counts[table] = row[0]
    return {table: n for table, n in counts.items() if n}


def memory_naming(shard: Shard, needle: str) -> list[str]:
    state = shard.state
    assert state is not None
    places = {"users": state.users, "dirty": state.dirty, "saving": state.saving, "last slates": shard.last_slates}
    return [name for name, place in places.items() if needle in place]


async def test_an_erased_user_leaves_no_trace_and_verify_stays_exact(pipeline: Pipeline) -> None:
    settings = pipeline.settings
    await pipeline.publish(
        [
            {"event_type": "seen", "entity_ids": [1, 2, 3], "user_id": GONE},  # no event_id: ids from the Nats-Msg-Id
            {"event_type": "clicked", "entity_id": 2, "user_id": GONE},
            {"event_type": "seen", "entity_ids": [2, 4], "user_id": KEEP},
            {"event_type": "clicked", "entity_id": 4, "user_id": KEEP},
        ]
    )
    escaped = orjson.dumps({"event_type": "clicked", "entity_id": 3, "user_id": GONE}).replace("ë".encode(), b"\\u00eb")
    await pipeline.publish(escaped)
    await pipeline.publish({"event_type": "purchased", "entity_id": 3, "user_id": GONE})  # dead-lettered
    seq = await pipeline.publish({"event_type": "clicked", "entity_id": 1, "user_id": KEEP})
    await pipeline.settle(seq)
    shard = pipeline.shard_of(GONE)
    assert shard.state is not None and GONE in shard.state.users
    assert isinstance((await shard.slates([(GONE, 5)]))[0], tuple)  # a slate to remember
    await wait_for(lambda: bool(pipeline.router.dead_letters.get("invalid")))
    await wait_for(lambda: GONE not in (shard.state.dirty if shard.state else {GONE}))  # checkpointed
    kept_before = (await pipeline.shard_of(KEEP).user_counts(KEEP) or {})["rows"]

    erased = await shard.erase(GONE)
    assert erased is not None and erased["in_memory"] and erased["checkpointed"]
    assert memory_naming(shard, GONE) == []
    async with short_lived_pool(settings.database_url or "", "test") as pool:
        store = ErasureStore(pool)

        async def scrubbed() -> bool:
            return not (await store.erasures())[0].pending

        deadline = asyncio.get_running_loop().time() + 20
        while not await scrubbed():
            assert asyncio.get_running_loop().time() < deadline, "the log scrub did not finish"
            await asyncio.sleep(0.05)
        [erasure] = await store.erasures()
    assert (erasure.messages, erasure.dead_letters) == (3, 1)  # the batch, the escaped one, the malformed one

    assert rows_naming(settings.database_url or "", GONE) == {}
    assert rows_naming(settings.database_url or "", KEEP)  # the search finds what is there
    streams = await everything_in_the_streams(pipeline)
    assert not [m for m in streams if GONE.encode() in m or b"\\u00eb" in m]
    assert any(KEEP.encode() in m for m in streams)
    for other in pipeline.shards.values():
        assert memory_naming(other, GONE) == []

    # Everyone else is as before, and exactly the recount of the log (redacted copies included).
    assert (await pipeline.shard_of(KEEP).user_counts(KEEP) or {})["rows"] == kept_before
    report = await verify(settings, lambda s: pipeline.shards[s].export(), settings.shards)
    assert report.ok and report.live.mismatches == 0 and report.erased_users == 1, report.as_dict()
    assert report.redacted_messages == 3 and report.checkpoints is not None  # a full recount, not a baseline

    # The id comes back as a new user, from its next event on.
    seq = await pipeline.publish({"event_type": "clicked", "entity_id": 5, "user_id": GONE})
    await pipeline.settle(seq)
    again = await shard.user_counts(GONE)
    assert again is not None and [r[0] for r in again["rows"] if r[0] > 0] == [5] and again["last_slate"] is None
    report = await verify(settings, lambda s: pipeline.shards[s].export(), settings.shards)
    assert report.ok, report.as_dict()

    # A restart restores from the checkpoints and the log with its holes: the same state.
    await shard.stop()
    reborn = pipeline.shards[shard.shard_id] = Shard(shard.shard_id, settings, seed=7)
    await restored(reborn)
    assert (await reborn.user_counts(GONE) or {})["rows"] == again["rows"]
    report = await verify(settings, lambda s: pipeline.shards[s].export(), settings.shards)
    assert report.ok, report.as_dict()

    # Erased again, their message last in the stream: reads over a range that ends in a hole end.
    assert await reborn.erase(GONE) is not None
    async with short_lived_pool(settings.database_url or "", "test") as pool:
        store = ErasureStore(pool)
        deadline = asyncio.get_running_loop().time() + 20
        while any(e.pending for e in await store.erasures()):
            assert asyncio.get_running_loop().time() < deadline, "the second log scrub did not finish"
            await asyncio.sleep(0.05)
    report = await verify(settings, lambda s: pipeline.shards[s].export(), settings.shards)
    assert report.ok and report.erased_users == 2, report.as_dict()


async def test_verify_stays_exact_while_a_log_scrub_is_under_way(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between an erasure and the end of its scrub, the user's events are still in the log (or
    half of them are): `mabrec verify` does not count them, as the state does not."""
    user, settings = "scrub-under-way", pipeline.settings
    seq = await pipeline.publish(
        [
            {"event_type": "clicked", "entity_id": 2, "user_id": user},
            {"event_type": "seen", "entity_ids": [2, 3], "user_id": KEEP},
        ]
    )
    await pipeline.settle(seq)
    shard = pipeline.shard_of(user)
    await wait_for(lambda: shard.state is not None and user not in shard.state.dirty)  # checkpointed
    held: list[tuple[int, str, int]] = []
    monkeypatch.setattr(shard._scrubber, "start", lambda *erasure: held.append(erasure))  # not started yet
    assert await shard.erase(user) is not None and len(held) == 1
    report = await verify(settings, lambda s: pipeline.shards[s].export(), settings.shards)
    assert report.ok and report.checkpoints is not None and report.checkpoints.mismatches == 0, report.as_dict()
    monkeypatch.undo()
    shard._scrubber.start(*held[0])  # and now it runs: the same answer after it
    async with short_lived_pool(settings.database_url or "", "test") as pool:
        store = ErasureStore(pool)
        deadline = asyncio.get_running_loop().time() + 20
        while await store.pending():
            assert asyncio.get_running_loop().time() < deadline, "the log scrub did not finish"
            await asyncio.sleep(0.05)
    report = await verify(settings, lambda s: pipeline.shards[s].export(), settings.shards)
    assert report.ok, report.as_dict()


@pytest.mark.parametrize("landed", [True, False], ids=["committed", "rolled-back"])
async def test_an_erasure_whose_commit_went_unanswered_leaves_a_shard_that_is_replaced_and_exact(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch, landed: bool
) -> None:
    """The erasure's transaction may have committed (its answer lost) or not: memory no longer
    tells. The shard stands down, so nothing of its memory is checkpointed over PostgreSQL; its
    replacement restores from PostgreSQL and the log, and verify is exact either way (then the
    erasure, retried, goes through)."""
    settings = pipeline.settings
    await pipeline.publish({"event_type": "clicked", "entity_id": 2, "user_id": GONE})
    seq = await pipeline.publish({"event_type": "clicked", "entity_id": 4, "user_id": KEEP})
    await pipeline.settle(seq)
    shard = pipeline.shard_of(GONE)
    await wait_for(lambda: GONE not in (shard.state.dirty if shard.state else {GONE}))  # checkpointed
    next_commit_unanswered(monkeypatch, landed)
    with pytest.raises(psycopg.OperationalError):
        await shard.erase(GONE)
    assert shard.broken and "erasure" in shard.broken and not shard.status()["ready"]
    assert await shard.checkpoint() == 0  # nothing of its memory goes back to PostgreSQL
    await shard.stop()
    reborn = pipeline.shards[shard.shard_id] = Shard(shard.shard_id, settings, seed=3)
    await restored(reborn)
    report = await verify(settings, lambda s: pipeline.shards[s].export(), settings.shards)
    assert report.ok, report.as_dict()
    assert await reborn.erase(GONE) is not None  # asked again: done
    report = await verify(settings, lambda s: pipeline.shards[s].export(), settings.shards)
    assert report.ok, report.as_dict()
