"""The event router, as a plain class (Ray wraps it in actors/ray_api.py).

It consumes the events stream in order, validates each event, dead-letters what is malformed,
and publishes to each shard its events in batches over NATS (system/bus/dataplane.py), every
batch naming the stream span it covers (see actors/shard.py). It keeps no durable position of
its own: on start it resumes after the furthest point any shard has covered, and never before
the oldest checkpoint; a shard that is behind replays its gap from the stream. Nothing is ever
re-sent: the next span tells a shard what it missed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any, Protocol

import orjson
from nats.aio.client import Client as NATS

from system.bus import dataplane, stream
from system.core import access
from system.core.events import Event
from system.core.settings import Settings
from system.core.sharding import SlotMap
from system.db.catalog_store import CatalogStore
from system.db.pool import short_lived_pool
from system.db.state_store import StateStore
from system.tasks import Background, gather_logged

log = logging.getLogger(__name__)

# Seconds: a shard without events still hears, this often, how far the stream is read. It is
# also the heartbeat that repairs a lost span when no later span follows it.
IDLE_ADVANCE = 2.0
# Seconds a routing cycle lasts at least when the stream is drained: events gather into fewer,
# larger spans (each costs the shard a fixed overhead) for at most this much added latency.
MIN_CYCLE = 0.015
# Events decoded and sorted between two turns of other work.
YIELD_EVERY = 2_000


class ShardPositions(Protocol):
    """How far each shard has applied the stream (asked over Ray in production)."""

    async def covered(self, shard: int) -> int | None: ...


class EventRouter:
    def __init__(self, settings: Settings, shards: ShardPositions, batch: int = 200) -> None:
        self.settings = settings
        self.shards = shards
        self.batch = batch
        self._loop = Background(self._run, "router", forever=True)
        self._nc: NATS | None = None
        self.declared: dict[int, int] = {}  # per shard: the stream sequence the last call covered through
        self._last_call: dict[int, float] = {}
        self.position = 0
        self.events = 0
        self.messages = 0
        self.dead_letters: Counter[str] = Counter()
        self.failed_calls = 0
        self.last_error: str | None = None
        self.slot_map: SlotMap | None = None
        self.known_movies: frozenset[int] = frozenset()
        self.catalog_version = -1
        self.paused = False

    def __repr__(self) -> str:  # what Ray shows: the dashboard's Repr column, log line prefixes
        return f"EventRouter({self.settings.events_subject}.>)"

    def ensure_running(self) -> dict[str, Any]:
        """Start the routing loop if it is not running, nor paused (idempotent). Returns `status()`."""
        if not self.paused:
            self._loop.ensure()
        return self.status()

    async def pause(self, shards: int) -> int:
        """Stop routing (slots are about to change hands), after telling every shard in
        `range(shards)` how far the stream is routed. Returns that position. The supervisor
        has set the pause in PostgreSQL first, so a router restarted meanwhile waits too."""
        self.paused = True
        await self._loop.cancel()
        if self._nc is not None:
            await asyncio.gather(*(self._send(shard, [], self.position) for shard in range(shards)))
        log.info("router paused", extra={"at": self.position})
        return self.position

    async def resume(self) -> dict[str, Any]:
        """Route again, by the slot map as PostgreSQL has it now."""
        self.paused = False
        self.slot_map = None  # read again: slots changed hands
        self._loop.ensure()
        return self.status()

    async def stop(self) -> None:
        await self._loop.cancel()
        nc, self._nc = self._nc, None
        if nc is not None:
            await nc.close()

    async def reload(self) -> None:
        """Re-read the catalog and slot map (the supervisor calls this when they change)."""
        async with short_lived_pool(self.settings.database_url or "", "router") as pool:
            catalog_store, state_store = CatalogStore(pool), StateStore(pool)
            version = await catalog_store.version()
            if version != self.catalog_version:
                catalog = await catalog_store.read()
                self.known_movies, self.catalog_version = catalog.id_set, catalog.version
            self.slot_map = await state_store.slot_map()

    async def _run(self) -> None:
        backoff = 0.5
        while True:
            try:
                await self._consume(self.settings)  # returns only when paused
                raise asyncio.CancelledError  # pause() cancelled this loop, and the cancellation got lost
            except Exception as exc:  # noqa: BLE001 - NATS or PostgreSQL away: log, back off, resume
                self.last_error = repr(exc)
                log.warning("router loop restarting", extra={"error": repr(exc), "pause": backoff})
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _consume(self, settings: Settings) -> None:
        await self._wait_while_paused()
        if self.slot_map is None:
            await self.reload()
        assert self.slot_map is not None
        if self._nc is None:
            self._nc = await stream.connect(
                settings.nats_url_for(access.ROUTER), f"{settings.namespace}-router", access.ROUTER
            )
        js = self._nc.jetstream()
        start = await self._start_position()
        self.position = start - 1
        self.declared = {shard: start - 1 for shard in range(self.slot_map.shards)}
        cursor = stream.StreamCursor(js, settings.stream, start)
        log.info("router reading the stream", extra={"from_seq": start})
        loop = asyncio.get_running_loop()
        try:
            while not self.paused:  # the flag too: a cancellation can get lost (system/tasks.py)
                began = loop.time()
                batch = await cursor.fetch(self.batch, timeout=0.5)
                if batch:
                    await self._route(js, batch)
                await self._advance_idle()
                if batch and len(batch) < self.batch:
                    await asyncio.sleep(MIN_CYCLE - (loop.time() - began))
        finally:
            await cursor.close()

    async def _wait_while_paused(self) -> None:
        """A move in progress (set in PostgreSQL, so it holds across restarts): wait it out."""
        async with short_lived_pool(self.settings.database_url or "", "router") as pool:
            store = StateStore(pool)
            waited = False
            while (await store.deployment()).routing_paused:
                if not waited:
                    log.info("routing is paused (slots are changing hands); waiting")
                    waited = True
                await asyncio.sleep(0.1)
        if waited:
            self.slot_map = None  # the move is done: its map, not the one from before

    async def _start_position(self) -> int:
        """After the furthest sequence a live shard covers, and never before the oldest
        checkpoint: what every checkpoint covers needs no routing, so a cold start reads only
        the gap since the checkpoints, however long the log (a shard that is behind replays
        its own gap)."""
        assert self.slot_map is not None
        covered = await gather_logged(
            {str(s): self.shards.covered(s) for s in range(self.slot_map.shards)}, "asking a shard its position"
        )
        async with short_lived_pool(self.settings.database_url or "", "router") as pool:
            checkpointed = await StateStore(pool).oldest_checkpoint()
        return max([c for c in covered.values() if c is not None] + [checkpointed]) + 1

    async def _route(self, js: Any, batch: Sequence[stream.StreamMessage]) -> None:
        assert self.slot_map is not None
        per_shard: dict[int, list[tuple[int, int, Event]]] = {}
        routed = 0
        for msg in batch:
            if routed > YIELD_EVERY:  # a batch of large messages: let other work in (a health check)
                await asyncio.sleep(0)
                routed = 0
            events, problems = msg.decode(self.known_movies)
            routed += len(events) + len(problems)
            if problems:  # the message counts not at all: dead-lettered whole, with the first reason
                first = problems[0]
                reason = f"{len(problems)} problem(s), none of its events counted; item {first.at}: {first.detail}"
                await self._dead_letter(js, msg.seq, msg.data, first.label, reason)
            for event in events:
                per_shard.setdefault(self.slot_map.shard_of(event.user), []).append((msg.seq, msg.second, event))
                self.events += 1
        self.messages += len(batch)
        last = batch[-1].seq
        await asyncio.gather(*(self._send(shard, events, last) for shard, events in per_shard.items()))
        self.position = last

    async def _advance_idle(self) -> None:
        now = time.monotonic()
        # Also shards already told the position: if that span was lost (the shard was restarting,
        # NATS dropped it), this one's `prev` is past the shard's `covered` and it replays the gap.
        idle = [s for s in self.declared if now - self._last_call.get(s, 0) > IDLE_ADVANCE]
        await asyncio.gather(*(self._send(shard, [], self.position) for shard in idle))

    async def _send(self, shard: int, events: list[tuple[int, int, Event]], last: int) -> None:
        """Publish the shard's span (system/bus/dataplane.py). If it gets lost (the shard is down,
        NATS drops it), the next span starts past this one, and the shard replays the gap."""
        prev = self.declared.get(shard, last)
        self.declared[shard] = last
        self._last_call[shard] = time.monotonic()
        assert self._nc is not None
        subject = dataplane.apply_subject(self.settings.namespace, shard)
        try:
            for start, upto, chunk in dataplane.split_span(prev, last, events):
                await self._nc.publish(subject, dataplane.encode_apply(start, upto, chunk))
        except Exception as exc:  # noqa: BLE001 - a lost span is repaired by the next one
            self.failed_calls += 1
            self.last_error = f"shard {shard}: {exc!r}"
            log.warning("span publish failed", extra={"shard": shard, "error": repr(exc)})

    async def _dead_letter(self, js: Any, seq: int, item: Any, label: str, reason: str) -> None:
        self.dead_letters[label] += 1
        payload = item if isinstance(item, bytes) else orjson.dumps(item, default=str)
        headers = {"Mabrec-Reason": reason[:200], "Mabrec-Error": label, "Mabrec-Seq": str(seq)}
        try:
            await js.publish(self.settings.deadletter_subject, payload, headers=headers, timeout=2.0)
        except Exception as exc:  # noqa: BLE001 - the counter has it; a bad event never stops the loop
            log.warning("dead-letter publish failed", extra={"seq": seq, "error": repr(exc)})

    def status(self) -> dict[str, Any]:
        return {
            "running": self._loop.running or self.paused,  # paused on purpose: healthy
            "paused": self.paused,
            "pid": os.getpid(),
            "position": self.position,
            "events": self.events,
            "messages": self.messages,
            "dead_letters": dict(self.dead_letters),
            "failed_calls": self.failed_calls,
            "catalog_version": self.catalog_version,
            "last_error": self.last_error,
        }
