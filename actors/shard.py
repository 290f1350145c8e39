"""The shard actor, as a plain class: Ray wraps it in actors/ray_api.py.

A shard owns the users of some slots. Its state is `ShardState` in memory; its durability is
(checkpoint in PostgreSQL) + (the event stream after the checkpoint). The invariant it keeps:
`covered` is a stream sequence such that every event of its users up to it is applied, and none
after it. Every `apply` call names the stream span it covers, `(prev_seq, last_seq]`; when
`prev_seq` is ahead of `covered`, events were missed (a failed call, a restart) and the shard
replays the gap from the stream before applying. Events at or below `covered` are skipped. So
redeliveries and retries change nothing, and nothing is lost while the stream holds it.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from psycopg_pool import AsyncConnectionPool

from system.bus import dataplane, stream
from system.core import userstate
from system.core.catalog import Catalog
from system.core.errors import Unavailable
from system.core.events import Event, decode
from system.core.policy import Picks
from system.core.policy_config import PolicyConfig
from system.core.settings import Settings
from system.core.shard_state import ShardState, recent_to_bytes
from system.core.sharding import slot_of
from system.db.catalog_store import CatalogStore
from system.db.pool import open_pool
from system.db.state_store import StateStore
from system.tasks import Background, cancel_and_wait, start_task

log = logging.getLogger(__name__)


class ShardNotReady(Unavailable):
    """The shard is restoring (or could not reach PostgreSQL/NATS to restore yet)."""


class Shard:
    def __init__(
        self, shard_id: int, settings: Settings, policy: PolicyConfig | None = None, seed: int | None = None
    ) -> None:
        # Cheap and I/O-free: Ray re-runs this on every restart. `ensure_ready` restores.
        self.shard_id = shard_id
        self.settings = settings
        self.policy = policy or settings.policy()
        self.seed = seed
        self.state: ShardState | None = None
        self.covered = 0
        self.slots: list[int] = []
        self._slot_set: frozenset[int] = frozenset()
        self._saved_covered = -1
        self._pool: AsyncConnectionPool | None = None
        self._nc: NATS | None = None
        self._apply_lock = asyncio.Lock()
        self._checkpoint_lock = asyncio.Lock()
        self._restoring = Background(self._restore, f"shard-{shard_id} restore", forever=False)
        self._subscriptions: list[Any] = []
        self._stopped = False
        self._checkpointer: asyncio.Task[None] | None = None
        self.started = time.time()
        self.restored_at: float | None = None
        self.restore_seconds: float | None = None
        self.replayed = 0
        self.gaps = 0
        self.slate_calls = 0
        self.slates_served = 0
        self.apply_calls = 0
        self.checkpoints = 0
        self.checkpoint_errors = 0
        self.last_checkpoint: float | None = None
        self.last_error: str | None = None

    # --- lifecycle --------------------------------------------------------------------------

    async def ensure_ready(self) -> dict[str, Any]:
        """Start restoring from the checkpoint and the stream unless restored or restoring; never
        waits for it (a health check must not block). Returns `status()`."""
        if self.state is None:
            self._restoring.ensure()
        return self.status()

    async def wait_ready(self) -> dict[str, Any]:
        """Restore and wait for it; raises ShardNotReady if the restore fails."""
        if self.state is not None:
            return self.status()
        try:
            await self._restoring.wait()
        except Exception as exc:
            raise ShardNotReady(f"shard {self.shard_id} could not restore: {exc!r}") from exc
        return self.status()

    async def _restore(self) -> None:
        began = time.monotonic()
        settings = self.settings
        if self._pool is None:
            self._pool = await open_pool(settings.database_url or "", max_size=2, name=f"shard-{self.shard_id}")
        if self._nc is None:
            self._nc = await stream.connect(settings.nats_url or "", f"{settings.namespace}-shard-{self.shard_id}")
        store = StateStore(self._pool)
        catalog = await CatalogStore(self._pool).read()
        slots = (await store.slot_map()).slots_of(self.shard_id)
        slot_covered = await store.covered_by_slot(slots)
        covered = min(slot_covered.values(), default=0)
        rows = await store.load_users(slots)
        rng = np.random.default_rng(self.seed)
        state = await asyncio.to_thread(_build_state, catalog, self.policy, rng, rows)
        self.slots, self._slot_set = slots, frozenset(slots)
        end = await stream.last_seq(self._nc.jetstream(), settings.stream)
        async with self._apply_lock:
            self.covered = covered
            self._saved_covered = covered
            # Slots may have been checkpointed through different sequences (a re-shard brings
            # them from several shards): each skips the events its own checkpoint holds.
            await self._replay(state, covered, end, slot_covered)
            self.state = state
        self.restored_at = time.time()
        self.restore_seconds = time.monotonic() - began
        # The catalog and the restored users live as long as the process and hold no cycles:
        # keep them out of the garbage collector's full passes, which over a million users would
        # stall serving for tens of milliseconds. Collected first, so no garbage is pinned.
        gc.collect()
        gc.freeze()
        log.info(
            "shard restored",
            extra={
                "shard": self.shard_id,
                "users": len(state.users),
                "checkpoint_seq": covered,
                "replayed": self.replayed,
                "seconds": round(self.restore_seconds, 3),
            },
        )
        if self._checkpointer is None:
            self._checkpointer = start_task(
                self._checkpoint_loop(), f"shard-{self.shard_id} checkpoints", self._restart_checkpoints
            )
        await self._listen()

    def _restart_checkpoints(self, exc: BaseException | None) -> None:
        self._checkpointer = (
            None
            if self._stopped
            else start_task(self._checkpoint_loop(), f"shard-{self.shard_id} checkpoints", self._restart_checkpoints)
        )

    async def _listen(self) -> None:
        """Take the data plane's messages (system/bus/dataplane.py): event spans from the router, and
        slate and profile requests from the API. Only once restored: until then requests find
        no responder (the API answers from popularity) and spans are missed (and replayed)."""
        assert self._nc is not None
        namespace = self.settings.namespace
        self._subscriptions = [
            await self._nc.subscribe(dataplane.apply_subject(namespace, self.shard_id), cb=self._on_apply),
            await self._nc.subscribe(dataplane.rpc_subject(namespace, self.shard_id), cb=self._on_rpc),
        ]

    async def _on_apply(self, msg: Msg) -> None:
        try:
            await self.apply(*dataplane.decode_apply(msg.data))
        except Exception as exc:  # the next span shows the gap; the stream has the events
            log.warning("event span not applied", extra={"shard": self.shard_id, "error": repr(exc)})

    async def _on_rpc(self, msg: Msg) -> None:
        try:
            op, args = dataplane.decode_call(msg.data)
            if op == dataplane.SLATES:
                reply = dataplane.encode_reply(await self.slates([(uxid, limit) for uxid, limit in args]))
            elif op == dataplane.PROFILE:
                reply = dataplane.encode_reply(await self.user_counts(args))
            else:
                reply = dataplane.encode_reply(error=f"unknown operation {op!r}")
        except Exception as exc:  # noqa: BLE001 - the caller gets the error as the reply
            log.warning("shard request failed", extra={"shard": self.shard_id, "error": repr(exc)})
            reply = dataplane.encode_reply(error=repr(exc))
        try:
            await msg.respond(reply)
        except NatsError as exc:  # the caller times out and answers from popularity
            log.warning("shard reply lost", extra={"shard": self.shard_id, "error": repr(exc)})

    async def stop(self) -> dict[str, Any]:
        """Final checkpoint, then release connections (idempotent). The actor may be killed after this."""
        if self._stopped:
            return self.status()
        self._stopped = True
        for subscription in self._subscriptions:
            try:
                await subscription.unsubscribe()
            except NatsError as exc:  # NATS is down: the subscription dies with the connection
                log.info("unsubscribe failed", extra={"shard": self.shard_id, "error": repr(exc)})
        self._subscriptions = []
        checkpointer, self._checkpointer = self._checkpointer, None
        await cancel_and_wait(checkpointer)
        await self._restoring.cancel()
        if self.state is not None:
            await self.checkpoint()
        if self._nc is not None:
            await self._nc.close()
        if self._pool is not None:
            await self._pool.close()
        return self.status()

    # --- events -----------------------------------------------------------------------------

    async def apply(self, prev_seq: int, last_seq: int, events: Sequence[tuple[int, Event]]) -> int:
        """Apply the events of stream span (prev_seq, last_seq] that belong to this shard.
        Returns `covered` afterwards."""
        if self.state is None:
            raise ShardNotReady(f"shard {self.shard_id} is restoring")
        self.apply_calls += 1
        async with self._apply_lock:
            state = self.state
            if prev_seq > self.covered:
                self.gaps += 1
                await self._replay(state, self.covered, prev_seq)
            fresh = [e for seq, e in events if seq > self.covered and slot_of(e.user) in self._slot_set]
            state.apply(fresh)
            self.covered = max(self.covered, last_seq)
            return self.covered

    async def _replay(
        self, state: ShardState, after: int, through: int, slot_covered: dict[int, int] | None = None
    ) -> None:
        """Apply this shard's events of stream span (after, through] from the stream itself
        (and, with `slot_covered`, only those past their slot's checkpoint)."""
        assert self._nc is not None
        floor = slot_covered or {}
        async for batch in stream.read_range(self._nc.jetstream(), self.settings, after, through):
            mine = [
                e
                for msg in batch
                for e in decode(msg.data)[0]
                if (slot := slot_of(e.user)) in self._slot_set and msg.seq > floor.get(slot, 0)
            ]
            self.replayed += state.apply(mine)
            self.covered = batch[-1].seq  # together with the apply above: no await in between
        self.covered = max(self.covered, through)

    # --- serving ----------------------------------------------------------------------------

    async def slates(self, requests: Sequence[tuple[str, int]]) -> list[Picks]:
        """A batch of (uxid, limit) -> per request, movie ids best first and why each is there."""
        state = self.state
        if state is None:
            raise ShardNotReady(f"shard {self.shard_id} is restoring")
        self.slate_calls += 1
        self.slates_served += len(requests)
        return [state.slate(uxid, limit) for uxid, limit in requests]

    async def user_counts(self, uxid: str) -> list[list[int]]:
        """A user's raw evidence rows (key, clicks, seen): movie id > 0, minus facet id < 0."""
        if self.state is None:
            raise ShardNotReady(f"shard {self.shard_id} is restoring")
        rows: list[list[int]] = self.state.counts_of(uxid).tolist()
        return rows

    async def export(self) -> tuple[int, dict[str, tuple[bytes, bytes]]]:
        """(covered, {uxid: (counts, recent ids)}): one consistent snapshot, for `mabrec verify`."""
        state = self.state
        if state is None:
            raise ShardNotReady(f"shard {self.shard_id} is restoring")
        return self.covered, {
            u: (userstate.to_bytes(x.counts), recent_to_bytes(x.recent)) for u, x in state.users.items()
        }

    # --- checkpoints ------------------------------------------------------------------------

    async def checkpoint(self) -> int:
        """Write changed users and the covered sequence, atomically. Returns users written."""
        state = self.state
        if state is None or self._pool is None:
            return 0
        async with self._checkpoint_lock:
            rows, covered = state.take_dirty(), self.covered  # one consistent snapshot
            if not rows and covered == self._saved_covered:
                return 0
            try:
                await StateStore(self._pool).save(rows, self.slots, covered)
            except BaseException:
                state.dirty.update(row[0] for row in rows)
                raise
            self._saved_covered = covered
            self.checkpoints += 1
            self.last_checkpoint = time.time()
            return len(rows)

    async def _checkpoint_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.checkpoint_interval)
            try:
                await self.checkpoint()
            except Exception as exc:  # PostgreSQL down: keep serving from memory, retry next tick
                self.checkpoint_errors += 1
                self.last_error = repr(exc)
                log.warning("checkpoint failed", extra={"shard": self.shard_id, "error": repr(exc)})

    # --- catalog and popularity ---------------------------------------------------------------

    async def reload_catalog(self) -> int:
        """Switch to the stored catalog if it is another version than the one in use."""
        if self.state is None or self._pool is None:
            raise ShardNotReady(f"shard {self.shard_id} is restoring")
        store = CatalogStore(self._pool)
        if await store.version() != self.state.catalog.version:
            self.state.set_catalog(await store.read())
        return self.state.catalog.version

    async def popularity(self) -> tuple[int, np.ndarray, np.ndarray]:
        """(catalog version, clicks, impressions) per movie then facet, over this shard's users."""
        if self.state is None:
            raise ShardNotReady(f"shard {self.shard_id} is restoring")
        return self.state.catalog.version, self.state.local_clicks, self.state.local_seen

    async def set_popularity(self, version: int, clicks: np.ndarray, seen: np.ndarray) -> None:
        if self.state is not None:
            self.state.set_global_counts(version, clicks, seen)

    def status(self) -> dict[str, Any]:
        state = self.state
        return {
            "shard": self.shard_id,
            "ready": state is not None,
            "pid": os.getpid(),
            "slots": len(self.slots),
            "users": len(state.users) if state else 0,
            "covered_seq": self.covered,
            "checkpoint_seq": self._saved_covered,
            "events_applied": state.applied if state else 0,
            "events_duplicate": state.duplicates if state else 0,
            "unknown_movies": state.unknown_movies if state else 0,
            "dirty_users": len(state.dirty) if state else 0,
            "replayed": self.replayed,
            "gaps": self.gaps,
            "lag_buckets": state.lag_counts.tolist() if state else [],
            "slate_calls": self.slate_calls,
            "slates_served": self.slates_served,
            "apply_calls": self.apply_calls,
            "checkpoints": self.checkpoints,
            "checkpoint_errors": self.checkpoint_errors,
            "last_checkpoint": self.last_checkpoint,
            "restore_seconds": self.restore_seconds,
            "catalog_version": state.catalog.version if state else None,
            "last_error": self.last_error or self._restoring.last_error,
        }


def _build_state(
    catalog: Catalog, policy: PolicyConfig | None, rng: np.random.Generator, rows: list[tuple[str, bytes, bytes]]
) -> ShardState:
    state = ShardState(catalog, policy, rng)
    for uxid, counts, recent in rows:
        state.load_user(uxid, counts, recent)
    state.refresh_model()
    return state
