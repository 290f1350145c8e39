"""The event pipeline without Ray: plain Shard and EventRouter objects against real PostgreSQL
and NATS JetStream (Ray only wraps them; the end-to-end tests run them as actors)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import orjson
import psycopg
import pytest
from nats.js import JetStreamContext
from psycopg_pool import AsyncConnectionPool

from actors.router import EventRouter
from actors.shard import Shard
from system.core.catalog_file import read_movies
from system.core.settings import Settings
from system.core.sharding import SlotMap
from system.db.catalog_store import CatalogStore
from system.db.migrations import migrate
from system.db.pool import short_lived_pool
from system.db.state_store import StateStore
from tests.conftest import SMALL_CSV


async def restored(shard: Shard) -> dict[str, Any]:
    """Restore a plain Shard and wait for it, as the supervisor's health loop has an actor do;
    raises what the restore raised. Returns its status."""
    await shard.ensure_ready()
    await shard._restoring.wait()
    return shard.status()


def next_commit_unanswered(monkeypatch: pytest.MonkeyPatch, landed: bool) -> None:
    """The next transaction to end commits (`landed`) or rolls back, and then its caller hears
    only that the connection dropped: a COMMIT whose answer was lost. Once."""
    commit_or_roll_back = psycopg.AsyncTransaction.__aexit__

    async def unanswered(self: psycopg.AsyncTransaction, *exc: object) -> bool:
        monkeypatch.undo()
        await commit_or_roll_back(self, *((None, None, None) if landed else (RuntimeError, RuntimeError(), None)))
        raise psycopg.OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(psycopg.AsyncTransaction, "__aexit__", unanswered)


async def covered_by_slot(pool: AsyncConnectionPool, slots: Iterable[int]) -> dict[int, int]:
    """Per slot, the event sequence its checkpoint covers."""
    async with pool.connection() as conn:
        rows = await (
            await conn.execute("SELECT slot, covered_seq FROM slots WHERE slot = ANY(%s)", (list(slots),))
        ).fetchall()
    return {int(slot): int(covered) for slot, covered in rows}


class LocalShards:
    """`ShardPositions` straight from plain Shard objects (Ray's part is to be the transport)."""

    def __init__(self, shards: dict[int, Shard]) -> None:
        self.shards = shards

    async def covered(self, shard: int) -> int | None:
        status = self.shards[shard].status()
        return status["covered_seq"] if status["ready"] else None


@dataclass
class Pipeline:
    settings: Settings
    js: JetStreamContext
    shards: dict[int, Shard]
    router: EventRouter
    slot_map: SlotMap

    def shard_of(self, uxid: str) -> Shard:
        return self.shards[self.slot_map.shard_of(uxid)]

    async def publish(self, payload: object, subject: str | None = None) -> int:
        data = payload if isinstance(payload, bytes) else orjson.dumps(payload)
        ack = await self.js.publish(subject or self.settings.events_subject, data)
        return int(ack.seq)

    async def settle(self, seq: int, user: str | None = None, timeout: float = 10.0) -> None:
        """Wait until `user`'s shard (or every shard) has applied the stream through `seq`."""
        shards = [self.shard_of(user)] if user else list(self.shards.values())
        await wait_for(lambda: all(s.covered >= seq for s in shards), timeout)


async def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


async def prepare(settings: Settings) -> SlotMap:
    await migrate(settings.database_url or "")
    async with short_lived_pool(settings.database_url or "", "test") as pool:
        await CatalogStore(pool).load(list(read_movies(SMALL_CSV)), source="small")
        return await StateStore(pool).ensure_slot_map(settings.shards)


async def start_pipeline(settings: Settings, js: JetStreamContext) -> Pipeline:
    slot_map = await prepare(settings)
    shards = {i: Shard(i, settings, seed=i) for i in range(settings.shards)}
    for shard in shards.values():
        await restored(shard)
    router = EventRouter(settings, LocalShards(shards))
    router.ensure_running()
    return Pipeline(settings, js, shards, router, slot_map)


async def stop_pipeline(pipeline: Pipeline) -> None:
    await pipeline.router.stop()
    for shard in pipeline.shards.values():
        await shard.stop()
