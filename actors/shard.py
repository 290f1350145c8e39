"""The shard actor, as a plain class: Ray wraps it in actors/ray_api.py.

A shard owns the users of some slots. Its state is `ShardState` in memory (the users in use);
its durability is (checkpoint in PostgreSQL) + (the event stream after the checkpoint). The
invariant it keeps: `covered` is a stream sequence such that every event of its users up to it
is applied, and none after it. Every `apply` call names the stream span it covers,
`(prev_seq, last_seq]`; when `prev_seq` is ahead of `covered`, events were missed (a failed
call, a restart) and the shard replays the gap from the stream before applying. Events at or
below `covered` are skipped. So redeliveries and retries change nothing, and nothing is lost
while the stream holds it.

Growth: a restore reads no user; each user is loaded from their checkpoint when first needed
(one indexed read, for a whole batch of users), and users idle longest leave memory once
checkpointed. One writer per slot: the restore takes the slots with a new epoch, and a
checkpoint from an older owner is refused (`Fenced`), after which that owner stops serving.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import psycopg
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from system.bus import dataplane, stream
from system.core import access, userstate
from system.core.errors import Unavailable
from system.core.events import Event
from system.core.policy import Picks
from system.core.policy_config import PolicyConfig
from system.core.popularity import Popularity
from system.core.settings import Settings
from system.core.shard_state import COUNTS, SEEN_IDS, ShardState
from system.core.sharding import slot_of, slot_ranges
from system.db.catalog_store import CatalogStore
from system.db.erasure_store import ErasureStore
from system.db.pool import open_pool
from system.db.state_store import Checkpoint, Fenced, StateStore, Writer
from system.erasure import LogScrubber
from system.tasks import Background, cancel_and_wait, start_task

log = logging.getLogger(__name__)


# Events applied in one go, without letting other work in.
APPLY_CHUNK = 2_000
# Slots whose checkpointed users are read in one query when indexing them (a few thousand users
# a slot at two million users): small enough that a load or a checkpoint never waits long.
INDEX_CHUNK = 16
# How long the index waits after a failed read before it tries again, at most.
INDEX_RETRY_MAX = 30.0
# Users whose last slate a shard remembers, for the admin profile's "why": the most recent.
LAST_SLATES = 10_000
# How long a batch of slates waits for its users' checkpoints to be read (well within the API's
# 2 s): past it, those users' requests fail alone (the API answers them from popularity) and the
# rest of the batch is answered; the reads go on for their next request.
SLATE_READ_WAIT = 0.5
# Requests answered at once (each in a task of its own, so a slow one holds up no other); past
# it, the next waits its turn in the subscription.
ANSWERING_MAX = 32

# A shard's answer for one slate request: the picks, None if the user's slot is not this shard's,
# or {"error": why} if that request alone failed.
Answer = Picks | None | dict[str, str]


# What made an apply or a checkpoint fail: an outage of a service (waited out), or a bug.
POSTGRES, NATS_DOWN, NOT_READY, REFUSED, BUG = "postgres", "nats", "not_ready", "refused", "bug"
# A bug that fails the same apply (or checkpoint) this many times in a row breaks the shard.
BROKEN_AFTER = 3


def cause_of(exc: BaseException) -> str:
    """An outage of PostgreSQL or NATS, a shard not restored (yet), a span refused (it claims
    more than the log has), or else: a bug."""
    if isinstance(exc, PastStreamEnd):
        return REFUSED
    if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError | PoolTimeout):
        return POSTGRES
    if isinstance(exc, NatsError | TimeoutError | Unavailable) and not isinstance(exc, ShardNotReady):
        return NATS_DOWN  # (system/bus/stream.py raises Unavailable when it cannot read the log)
    if isinstance(exc, ShardNotReady):
        return NOT_READY
    return BUG


class ShardNotReady(Unavailable):
    """The shard is restoring (or could not reach PostgreSQL/NATS to restore yet)."""


class PastStreamEnd(ValueError):
    """A span that claims events the stream does not have yet: forged (or a bug). Applying it
    would move `covered` past events still to come, and the shard would skip them."""


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
        self.epochs: dict[int, int] = {}  # slot -> the epoch this shard took it with
        self._slot_set: frozenset[int] = frozenset()
        self._saved_covered = -1
        self._instance = str(uuid.uuid4())  # this process, as the checkpoints it writes name it
        self._cuts = 0  # checkpoints cut so far
        # Popularity of checkpoints whose COMMIT went unanswered: the next one adds what did not land.
        self._in_doubt: list[tuple[int, Popularity]] = []
        self._pool: AsyncConnectionPool | None = None
        self._nc: NATS | None = None
        # Whatever changes the users in memory (applying events, loading users) takes this lock:
        # a load then cannot interleave with an apply, nor bring back an older state.
        self._apply_lock = asyncio.Lock()
        self._reading: dict[str, asyncio.Future[None]] = {}  # users whose checkpoint is being read
        # Bumped whenever users may leave this shard's hands or their stored state change outside
        # a read (a release, an erasure): a read that overlapped it reads again.
        self._generation = 0
        self._taking: frozenset[int] = frozenset()  # slots an acquire is catching up, not yet owned
        self._answering: set[asyncio.Task[None]] = set()  # requests being answered
        self._checkpoint_lock = asyncio.Lock()
        self._restoring = Background(self._restore, f"shard-{shard_id} restore", forever=False)
        self._subscriptions: list[Any] = []
        self._stopped = False
        self.fenced: str | None = None  # why this instance stopped serving: a successor owns its slots
        self.broken: str | None = None  # why it asks to be replaced: a bug failed the same work again and again
        self.failures: Counter[str] = Counter()  # "<apply|checkpoint>:<cause>" -> failures
        self._stuck, self._stuck_at = 0, ("", -1)  # failures in a row of a bug, at (stage, covered)
        # Loops for as long as the shard serves; one that dies is started again, after a pause,
        # by the next `ensure_ready` (the supervisor's health loop calls it every second).
        self._checkpoints = Background(self._checkpoint_loop, f"shard-{shard_id} checkpoints", forever=True)
        self._indexing = Background(self._index_loop, f"shard-{shard_id} index", forever=True)
        self._index_wanted = asyncio.Event()  # slots to index: restored, or acquired
        self.started = time.time()
        self.restored_at: float | None = None
        self.restore_seconds: float | None = None
        self.replayed = 0
        self.gaps = 0
        self.refused_spans = 0  # spans past the stream's end, refused (PastStreamEnd)
        self._stream_end = 0  # the stream's last sequence, as last asked
        self.loads = 0  # indexed reads of users who were not in memory
        self.users_loaded = 0
        self.reads_skipped = 0  # users not in memory known to have no checkpoint: started empty
        self.slate_calls = 0
        self.slates_served = 0
        self.apply_calls = 0
        self.checkpoints = 0
        self.checkpoint_errors = 0
        self.last_checkpoint: float | None = None
        self.last_error: str | None = None
        # uxid -> (when, movie ids, reasons) of their last slate, least recent first
        self.last_slates: OrderedDict[str, tuple[float, list[int], list[str]]] = OrderedDict()
        self.erased = 0
        self._scrubber = LogScrubber(settings, self._connections)

    def __repr__(self) -> str:
        """What Ray shows for this actor (the dashboard's Repr column, its log lines' prefix). Ray
        takes it once, as the actor is created: the slots are there only once it has restored."""
        return f"Shard({self.shard_id}" + (f", slots {slot_ranges(self.epochs)})" if self.epochs else ")")

    @property
    def slots(self) -> list[int]:
        return sorted(self.epochs)

    # --- lifecycle --------------------------------------------------------------------------

    async def ensure_ready(self) -> dict[str, Any]:
        """Start restoring from the checkpoint and the stream unless restored or restoring; never
        waits for it (a health check must not block). Returns `status()`."""
        if self.fenced:
            raise ShardNotReady(f"shard {self.shard_id} (pid {os.getpid()}) was fenced: {self.fenced}")
        if self.broken:
            raise ShardNotReady(f"shard {self.shard_id} (pid {os.getpid()}) is broken: {self.broken}")
        if self.state is None:
            self._restoring.ensure()
        elif not self._stopped:
            self._checkpoints.ensure()
            self._indexing.ensure()
        return self.status()

    async def _restore(self) -> None:
        began = time.monotonic()
        settings = self.settings
        if self._pool is None:
            # Checkpoints, the index and reads of users each take a connection: a read that hangs
            # must not leave a checkpoint without one.
            self._pool = await open_pool(settings.database_url or "", max_size=4, name=f"shard-{self.shard_id}")
        if self._nc is None:
            self._nc = await stream.connect(
                settings.nats_url_for(access.SHARD), f"{settings.namespace}-shard-{self.shard_id}", access.SHARD
            )
        store = StateStore(self._pool)
        catalog = await CatalogStore(self._pool).read()
        # Take the slots: from here on an older owner's checkpoints are refused, so the users'
        # checkpoints, read later as they are needed, can only change through this shard.
        claims = await store.take_slots(self.shard_id)
        popularity = await store.popularity()
        state = ShardState(
            catalog,
            self.policy,
            np.random.default_rng(self.seed),
            dedup_window=settings.dedup_window,
            resident_users=settings.resident_users,
        )
        state.set_popularity(popularity)
        self.epochs = {slot: claim.epoch for slot, claim in claims.items()}
        self._slot_set = frozenset(claims)
        self._generation += 1  # reads for an earlier state admit nothing
        slot_covered = {slot: claim.covered for slot, claim in claims.items()}
        end = await stream.last_seq(self._nc.jetstream(), settings.stream)
        covered = min(slot_covered.values(), default=end)  # no slot (a new shard): nothing to replay
        async with self._apply_lock:
            self.covered = covered
            self._saved_covered = covered
            self._in_doubt = []  # popularity is read afresh above
            # Slots may have been checkpointed through different sequences (a re-shard brings
            # them from several shards): each skips the events its own checkpoint holds.
            await self._replay(state, covered, end, slot_covered)
            self.state = state
        self.restored_at = time.time()
        self.restore_seconds = time.monotonic() - began
        # The catalog lives as long as the process and holds no cycles: keep it out of the
        # garbage collector's full passes. Collected first, so no garbage is pinned.
        gc.collect()
        gc.freeze()
        log.info(
            "shard restored",
            extra={
                "shard": self.shard_id,
                "slots": len(claims),
                "checkpoint_seq": covered,
                "replayed": self.replayed,
                "users_loaded": self.users_loaded,
                "seconds": round(self.restore_seconds, 3),
            },
        )
        self._checkpoints.ensure()
        self._index_wanted.set()
        self._indexing.ensure()
        await self._scrubber.resume(lambda uxid: slot_of(uxid) in self._slot_set)
        await self._listen()

    def _connections(self) -> tuple[JetStreamContext, AsyncConnectionPool]:
        if self._nc is None or self._pool is None:
            raise ShardNotReady(f"shard {self.shard_id} is restoring")
        return self._nc.jetstream(), self._pool

    async def _listen(self) -> None:
        """Take the data plane's messages (system/bus/dataplane.py): event spans from the router,
        and slate and profile requests from the API. Only once restored: until then requests
        find no responder (the API answers from popularity) and spans are missed (and replayed)."""
        assert self._nc is not None
        namespace = self.settings.namespace
        self._subscriptions = [
            await self._nc.subscribe(dataplane.apply_subject(namespace, self.shard_id), cb=self._on_apply),
            await self._nc.subscribe(dataplane.rpc_subject(namespace, self.shard_id), cb=self._on_rpc),
        ]

    async def _unlisten(self) -> None:
        for subscription in self._subscriptions:
            try:
                await subscription.unsubscribe()
            except NatsError as exc:  # NATS is down: the subscription dies with the connection
                log.info("unsubscribe failed", extra={"shard": self.shard_id, "error": repr(exc)})
        self._subscriptions = []

    async def _on_apply(self, msg: Msg) -> None:
        try:
            await self.apply(*dataplane.decode_apply(msg.data))
        except Exception as exc:  # noqa: BLE001 - counted by cause; the next span shows the gap
            self._failed("apply", exc)
            log.warning("event span not applied", extra={"shard": self.shard_id, "error": repr(exc)})
        else:
            self._stuck = 0

    def _failed(self, stage: str, exc: Exception) -> None:
        """Count a failed apply or checkpoint by its cause. An outage (PostgreSQL, NATS) is waited
        out; a bug is not: the same one `BROKEN_AFTER` times in a row (an apply that fails while the
        shard is stuck at one position, or a checkpoint) and the shard says it is broken, so the
        supervisor replaces it (the new process restores from the checkpoint and the log)."""
        cause = cause_of(exc)
        self.failures[f"{stage}:{cause}"] += 1
        self.last_error = f"{stage}: {exc!r}"
        if cause != BUG:
            return
        if self._stuck and self._stuck_at == (stage, self.covered):
            self._stuck += 1
        else:
            self._stuck, self._stuck_at = 1, (stage, self.covered)
        if self._stuck >= BROKEN_AFTER and not self.broken:
            self.broken = f"{stage} failed {self._stuck} times in a row at #{self.covered}: {exc!r}"
            log.error(
                "shard broken: a bug, not an outage; it asks to be replaced",
                extra={"shard": self.shard_id, "why": self.broken},
            )

    async def _on_rpc(self, msg: Msg) -> None:
        """nats-py hands a subscription's messages over one at a time: each request is answered in
        a task of its own, so one that waits (on a user's checkpoint) holds up no other."""
        if len(self._answering) >= ANSWERING_MAX:
            await self._answer(msg)  # enough at once: this one waits its turn
            return
        task = asyncio.create_task(self._answer(msg), name=f"shard-{self.shard_id} answer")
        self._answering.add(task)
        task.add_done_callback(self._answering.discard)

    async def _answer(self, msg: Msg) -> None:
        """Answer one request; never raises (its failure is the reply, and logged)."""
        try:
            op, args = dataplane.decode_call(msg.data)
            if op == dataplane.SLATES:
                reply = dataplane.encode_reply(await self.slates([(uxid, limit) for uxid, limit in args]))
            elif op == dataplane.PROFILE:
                reply = dataplane.encode_reply(await self.user_counts(args))
            elif op == dataplane.ERASE:
                reply = dataplane.encode_reply(await self.erase(args))
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
        await self._unlisten()
        for answering in list(self._answering):  # callers of an unanswered request time out and fall back
            await cancel_and_wait(answering)
        await self._checkpoints.cancel()
        await self._indexing.cancel()
        await self._scrubber.stop()
        await self._restoring.cancel()
        if self.state is not None and not self.fenced:
            try:
                await self.checkpoint()
            except Fenced:
                pass  # a successor owns the slots (logged by _fence): nothing of ours may land
        if self._nc is not None:
            await self._nc.close()
        if self._pool is not None:
            await self._pool.close()
        return self.status()

    async def _stand_down(self, reason: str) -> None:
        """What PostgreSQL holds may differ from memory in a way only a restore can mend (an
        erasure that may or may not have committed): stop serving and writing, and ask to be
        replaced; the new process restores from PostgreSQL and the log."""
        self.broken = reason
        log.error("shard standing down to be replaced", extra={"shard": self.shard_id, "why": reason})
        await self._unlisten()
        self.state = None  # no checkpoint can write this memory back

    async def _fence(self, reason: str) -> None:
        """A successor owns this shard's slots: stop serving them, and forget them."""
        self.fenced = reason
        log.error("fenced: a successor owns this shard's slots; no longer serving", extra={"shard": self.shard_id})
        await self._unlisten()
        self.state = None

    # --- users in memory ----------------------------------------------------------------------

    async def _resident(
        self,
        uxids: Iterable[str],
        slots: frozenset[int] | None = None,
        wait: float | None = None,
        state: ShardState | None = None,
    ) -> ShardState:
        """The state, with these users resident: those not in memory come from their checkpoints.
        Users the index knows have no checkpoint (new ones, mostly) start empty at once; the
        others are read, one read in flight per user however many ask (a slate, a profile, an
        apply), and no lock is held meanwhile: what waits on PostgreSQL is only what needs it.
        Only users of slots this shard owns (or, with `slots`, an acquire's catch-up: those it
        takes) are brought in. With `wait`, gives up waiting after that many seconds (the reads
        go on; those users are not resident yet); without, a failed read raises. `state`: the
        one a restore is replaying into, before it serves."""
        state = state or self.state
        if state is None:
            raise ShardNotReady(f"shard {self.shard_id} is restoring")
        owned = self._slot_set if slots is None else slots
        missing = [u for u in state.missing(uxids) if slot_of(u) in owned]
        if not missing:
            return state
        maybe = state.checkpointed.may_have(missing)
        fresh = [u for u, read in zip(missing, maybe, strict=True) if not read]
        state.admit(fresh, [])  # no await since `missing`: nothing came in meanwhile
        self.reads_skipped += len(fresh)
        ask = [u for u, read in zip(missing, maybe, strict=True) if read]
        if not ask:
            return state
        if unread := [u for u in ask if u not in self._reading]:
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            for uxid in unread:
                self._reading[uxid] = done
            start_task(self._read(state, unread, done), f"shard-{self.shard_id} read", forever=False)
        pending = {self._reading[u] for u in ask if u in self._reading}
        if pending:
            finished, _ = await asyncio.wait(pending, timeout=wait)
            if wait is None:
                for future in finished:
                    future.result()  # a failed read: the caller fails (an apply retries the span)
        return state

    async def _read(self, state: ShardState, users: list[str], done: asyncio.Future[None]) -> None:
        """Read these users' checkpoints and admit them, unless the state changed hands meanwhile
        (a release, an erasure, a restore: `_generation`), in which case what is still ours is
        read again: a read that started before a checkpoint or an erasure must not bring an older
        state back. `done` tells the waiters (its exception, if the read failed)."""
        registered = list(users)
        try:
            while users:
                generation = self._generation
                assert self._pool is not None
                rows = await StateStore(self._pool).load_users(users)
                self.loads += 1
                owned = self._slot_set | self._taking
                users = [u for u in users if u not in state.users and slot_of(u) in owned]
                if generation == self._generation:
                    state.admit(users, [r for r in rows if r[0] in set(users)])
                    self.users_loaded += len(rows)
                    break
            done.set_result(None)
        except Exception as exc:  # noqa: BLE001 - PostgreSQL away: the waiters hear it, the next ask reads again
            log.warning(
                "reading users failed", extra={"shard": self.shard_id, "users": len(registered), "error": repr(exc)}
            )
            self.last_error = repr(exc)
            done.set_exception(exc)
            done.exception()  # retrieved: a waiter may have stopped waiting
        finally:
            for uxid in registered:
                if self._reading.get(uxid) is done:
                    del self._reading[uxid]

    # --- events -----------------------------------------------------------------------------

    async def apply(self, prev_seq: int, last_seq: int, events: Sequence[tuple[int, int, Event]]) -> int:
        """Apply the events of stream span (prev_seq, last_seq] that belong to this shard (each
        with its stream sequence and second). Returns `covered` afterwards."""
        if self.state is None:
            raise ShardNotReady(f"shard {self.shard_id} is restoring")
        self.apply_calls += 1
        async with self._apply_lock:
            state = self.state
            if state is None:  # fenced while waiting for the lock
                raise ShardNotReady(f"shard {self.shard_id} is not serving")
            reach = max(prev_seq, last_seq)
            if reach > self._stream_end:  # asked only when a span goes past the last answer
                assert self._nc is not None
                self._stream_end = (await self._nc.jetstream().stream_info(self.settings.stream)).state.last_seq
                if reach > self._stream_end:
                    self.refused_spans += 1
                    raise PastStreamEnd(
                        f"span ({prev_seq}, {last_seq}] goes past the stream's last sequence {self._stream_end}"
                    )
            if prev_seq > self.covered:
                self.gaps += 1
                await self._replay(state, self.covered, prev_seq)
            fresh = [
                (second, e) for seq, second, e in events if seq > self.covered and slot_of(e.user) in self._slot_set
            ]
            await self._apply(state, fresh)
            self.covered = max(self.covered, last_seq)
            state.evict()
            return self.covered

    async def _replay(
        self,
        state: ShardState,
        after: int,
        through: int,
        slot_covered: dict[int, int] | None = None,
        only: frozenset[int] | None = None,
    ) -> None:
        """Apply this shard's events of stream span (after, through] from the stream itself
        (with `slot_covered`, only those past their slot's checkpoint). With `only`, just the
        events of those slots, and `covered` stays: a catch-up of slots just acquired."""
        assert self._nc is not None
        floor = slot_covered or {}
        slots = only if only is not None else self._slot_set
        async for batch in stream.read_range(self._nc.jetstream(), self.settings, after, through):
            mine = [
                (msg.second, e)
                for msg in batch
                for e in msg.decode(state.catalog.id_set)[0]
                if (slot := slot_of(e.user)) in slots and msg.seq > floor.get(slot, 0)
            ]
            self.replayed += await self._apply(state, mine, slots)
            if only is None:
                self.covered = batch[-1].seq  # under the apply lock: nothing else applied meanwhile
            state.evict()
        if only is None:
            self.covered = max(self.covered, through)

    # --- slots changing hands -----------------------------------------------------------------

    async def resync(self) -> dict[str, Any]:
        """Own exactly the slots the map gives this shard (after a move a supervisor's death
        interrupted): let go of the others, take the missing ones. Returns `status()`."""
        assert self._pool is not None
        mine = set((await StateStore(self._pool).slot_map()).slots_of(self.shard_id))
        if extra := sorted(self._slot_set - mine):
            await self.release(extra)
        if missing := sorted(mine - self._slot_set):
            await self.acquire(missing)
        return self.status()

    async def release(self, slots: Sequence[int]) -> int:
        """Give these slots up (a re-shard moves them): a final checkpoint, then their users
        leave memory and their events are no longer this shard's. Returns the sequence the
        checkpoint covers: where the next owner starts."""
        async with self._checkpoint_lock, self._apply_lock:
            state = self.state
            if state is None:
                raise ShardNotReady(f"shard {self.shard_id} is not serving")
            await self._save(self._cut())
            leaving = frozenset(slots) & self._slot_set
            state.release(leaving)
            self.epochs = {s: e for s, e in self.epochs.items() if s not in leaving}
            self._slot_set = frozenset(self.epochs)
            self._generation += 1
            log.info("released slots", extra={"shard": self.shard_id, "slots": len(leaving), "at": self.covered})
            return self.covered

    async def acquire(self, slots: Sequence[int]) -> int:
        """Take these slots (the map gives them to this shard now): a new epoch each, then what
        the stream holds for them after their checkpoints and up to where this shard is, so they
        are where the rest of its slots are. Their users load as they are needed."""
        assert self._pool is not None
        async with self._apply_lock:
            state = self.state
            if state is None:
                raise ShardNotReady(f"shard {self.shard_id} is not serving")
            claims = await StateStore(self._pool).take_slots(self.shard_id, slots)
            if len(claims) != len(set(slots)):
                raise ShardNotReady(f"shard {self.shard_id} was given {len(slots)} slots, the map says {len(claims)}")
            ahead = max((c.covered for c in claims.values()), default=0)
            if ahead > self.covered:  # the slots are further along: bring the others there first
                await self._replay(state, self.covered, ahead)
            covered = {slot: claim.covered for slot, claim in claims.items()}
            behind = min(covered.values(), default=self.covered)
            if behind < self.covered:
                self._taking = frozenset(claims)
                try:
                    await self._replay(state, behind, self.covered, covered, only=frozenset(claims))
                finally:
                    self._taking = frozenset()
            self.epochs |= {slot: claim.epoch for slot, claim in claims.items()}
            self._slot_set = frozenset(self.epochs)
            self._index_wanted.set()  # their users' checkpoints are read now that the slots are taken
            log.info("acquired slots", extra={"shard": self.shard_id, "slots": len(claims), "at": self.covered})
            return self.covered

    async def _apply(
        self, state: ShardState, events: Sequence[tuple[int, Event]], slots: frozenset[int] | None = None
    ) -> int:
        """Apply (stream second, event) pairs, loading their users first, a chunk at a time:
        between chunks other work gets its turn (a slate, a health check), so a long replay
        never holds the process for seconds. The caller holds the apply lock."""
        applied = 0
        for start in range(0, len(events), APPLY_CHUNK):
            chunk = events[start : start + APPLY_CHUNK]
            await self._resident([e.user for _, e in chunk], slots, state=state)
            applied += state.apply([e for _, e in chunk], [second for second, _ in chunk])
            await asyncio.sleep(0)
        return applied

    # --- serving ----------------------------------------------------------------------------

    async def slates(self, requests: Sequence[tuple[str, int]]) -> list[Answer]:
        """A batch of (uxid, limit) -> per request, movie ids best first and why each is there;
        None for a user whose slot is not (or no longer) this shard's (the caller asks again);
        `{"error": why}` for one that failed alone: its user's state could not be read within
        SLATE_READ_WAIT (the read goes on, for their next request), or their slate raised."""
        state = await self._resident((uxid for uxid, _ in requests), wait=SLATE_READ_WAIT)
        self.slate_calls += 1
        answers: list[Answer] = []
        for uxid, limit in requests:
            if slot_of(uxid) not in self._slot_set:  # a release may have run meanwhile
                answers.append(None)
            elif uxid not in state.users:
                answers.append({"error": f"the state of {uxid!r} is still being read"})
            else:
                try:
                    answers.append(state.slate(uxid, limit))
                except Exception as exc:  # noqa: BLE001 - that request fails, not its batch
                    log.exception("a slate failed", extra={"shard": self.shard_id})
                    answers.append({"error": repr(exc)})
        self.slates_served += sum(isinstance(a, tuple) for a in answers)
        self._remember_slates(requests, answers)
        return answers

    def _remember_slates(self, requests: Sequence[tuple[str, int]], answers: Sequence[Answer]) -> None:
        now, last = time.time(), self.last_slates
        for (uxid, _), slate in zip(requests, answers, strict=True):
            if isinstance(slate, tuple):
                last.pop(uxid, None)
                last[uxid] = (now, *slate)
        while len(last) > LAST_SLATES:
            last.popitem(last=False)

    async def user_counts(self, uxid: str) -> dict[str, Any] | None:
        """A user's raw evidence rows (key, clicks, seen): movie id > 0, minus facet id < 0, their
        tastes as the policy weighs them (ShardState.tastes), and their last slate if this shard remembers it ([when, movie ids, reasons]); None when the
        user's slot is not this shard's."""
        if slot_of(uxid) not in self._slot_set:
            return None
        state = await self._resident([uxid])
        if slot_of(uxid) not in self._slot_set:  # released while it loaded
            return None
        if uxid not in state.users:  # erased meanwhile: a new user
            return {"rows": [], "tastes": [], "last_slate": None}
        last = self.last_slates.get(uxid)
        return {
            "rows": state.counts_of(uxid).tolist(),
            "tastes": state.tastes(uxid),
            "last_slate": list(last) if last else None,
        }

    async def erase(self, uxid: str) -> dict[str, Any] | None:
        """Erase a user (a privacy request): their checkpoint and what it added to popularity
        leave PostgreSQL, their state leaves memory, both at once with every event of theirs
        through `covered`; then their messages leave the event log (system/erasure.py). The
        next event or request with their id starts a new user. None when the slot is not ours."""
        slot = slot_of(uxid)
        async with self._checkpoint_lock, self._apply_lock:  # no cut and no apply in between
            state = self.state
            if state is None or self._pool is None:
                raise ShardNotReady(f"shard {self.shard_id} is restoring")
            if slot not in self._slot_set:
                return None
            through = self.covered
            sent: list[bool] = []
            try:
                erasure, saved = await ErasureStore(self._pool).erase_user(uxid, slot, self.epochs[slot], through, sent)
            except Fenced as exc:
                await self._fence(exc.detail)
                raise
            except BaseException as exc:
                if sent:  # its COMMIT may have landed: memory no longer matches PostgreSQL for this user
                    await self._stand_down(f"an erasure's commit went unanswered: {exc!r}")
                raise
            was_resident = state.erase(uxid, saved)
            self._generation += 1  # a read of theirs under way must not bring the erased state back
            self.last_slates.pop(uxid, None)
        self.erased += 1
        self._scrubber.start(erasure, uxid, through)
        log.info(
            "user erased; scrubbing the log", extra={"shard": self.shard_id, "erasure": erasure, "through": through}
        )
        return {
            "erasure": erasure,
            "through_seq": through,
            "in_memory": was_resident,
            "checkpointed": saved is not None,
        }

    async def export(self) -> tuple[int, dict[str, tuple[bytes, bytes]]]:
        """(covered, {uxid: (counts, seen ids)}) of the users in memory: one consistent
        snapshot, for `mabrec verify` (the others are as their checkpoints hold them)."""
        async with self._apply_lock:  # not halfway through a span
            state = self.state
            if state is None:
                raise ShardNotReady(f"shard {self.shard_id} is restoring")
            return self.covered, {
                u: (userstate.to_bytes(user[COUNTS]), user[SEEN_IDS]) for u, user in state.users.items()
            }

    # --- checkpoints ------------------------------------------------------------------------

    async def checkpoint(self) -> int:
        """Write changed users, their popularity and the covered sequence, atomically (refused if
        a successor took the slots). Then evict what the budget asks. Returns users written."""
        if self.state is None or self._pool is None:
            return 0
        # Lock order everywhere: checkpoint, then apply.
        async with self._checkpoint_lock:
            async with self._apply_lock:  # a cut between applies: the rows hold what `covered` says
                cut = self._cut()
            written = await self._save(cut)
            async with self._apply_lock:  # not while an apply awaits a load: it may need those users
                if self.state is not None:
                    self.state.evict()
            return written

    def _cut(self) -> Checkpoint | None:
        """What a checkpoint writes now (None: nothing changed). The caller holds the apply lock."""
        state = self.state
        if state is None:
            return None
        rows, delta, covered = state.take_dirty(), state.take_popularity(), self.covered
        if not rows and not len(delta.keys) and covered == self._saved_covered and not self._in_doubt:
            return None
        self._cuts += 1
        writer = Writer(self.shard_id, self._instance, self._cuts)
        return Checkpoint(rows, delta, dict(self.epochs), covered, writer, list(self._in_doubt))

    async def _save(self, cut: Checkpoint | None) -> int:
        """Write a cut; if that fails, its users and popularity go out with the next one. The
        caller holds the checkpoint lock: cuts land in the order they were taken."""
        if cut is None:
            return 0
        assert self._pool is not None
        try:
            await StateStore(self._pool).save(cut)
        except Fenced as exc:
            await self._fence(exc.detail)
            raise
        except BaseException as exc:
            if self.state is not None:
                self.state.dirty.update(row[0] for row in cut.users)  # rows are idempotent: written again
                if not cut.sent:
                    self.state.give_back(cut.popularity)
                else:  # it may have landed: the next checkpoint adds its popularity only if not
                    assert cut.writer is not None
                    self._in_doubt.append((cut.writer.number, cut.popularity))
                    log.warning(
                        "checkpoint's commit unanswered; the next one checks whether it landed",
                        extra={"shard": self.shard_id, "cut": cut.writer.number, "error": repr(exc)},
                    )
            raise
        finally:
            if self.state is not None:
                self.state.saved()
        self._in_doubt = []
        self._saved_covered = cut.covered
        self.checkpoints += 1
        self.last_checkpoint = time.time()
        return len(cut.users)

    async def _checkpoint_loop(self) -> None:
        while not self.fenced:
            await asyncio.sleep(self.settings.checkpoint_interval)
            try:
                await self.checkpoint()
            except Fenced:
                return  # logged by _fence; this instance is done
            except Exception as exc:  # noqa: BLE001 - counted by cause: PostgreSQL down is retried next tick
                self.checkpoint_errors += 1
                self._failed("checkpoint", exc)
                log.warning("checkpoint failed", extra={"shard": self.shard_id, "error": repr(exc)})
            else:
                if self._stuck_at[0] == "checkpoint":
                    self._stuck = 0

    async def _index_loop(self) -> None:
        """Index the checkpointed users of the slots this shard owns (ShardState.checkpointed), a
        few slots per read, whenever slots were taken; a read that fails is tried again later,
        and meanwhile those slots' users are read from PostgreSQL as before."""
        pause = 0.5
        while not self.fenced:
            await self._index_wanted.wait()
            state = self.state
            todo = [] if state is None else sorted(self._slot_set - state.checkpointed.indexed)
            if state is None or not todo:
                self._index_wanted.clear()
                continue
            assert self._pool is not None
            chunk = todo[:INDEX_CHUNK]
            generations = state.checkpointed.generations(chunk)
            try:
                uxids = await StateStore(self._pool).checkpointed_users(chunk)
            except Exception as exc:  # noqa: BLE001 - PostgreSQL down: loads read as before; retry later
                log.warning("indexing checkpoints failed", extra={"shard": self.shard_id, "error": repr(exc)})
                await asyncio.sleep(pause)
                pause = min(pause * 2, INDEX_RETRY_MAX)
                continue
            pause = 0.5
            if self.state is state:  # not a state replaced by a restore meanwhile
                state.checkpointed.add_slots(uxids, generations)

    # --- catalog and popularity ---------------------------------------------------------------

    async def reload_catalog(self) -> int:
        """Switch to the stored catalog if it is another version than the one in use."""
        if self.state is None or self._pool is None:
            raise ShardNotReady(f"shard {self.shard_id} is restoring")
        store = CatalogStore(self._pool)
        if await store.version() != self.state.catalog.version:
            self.state.set_catalog(await store.read())
        return self.state.catalog.version

    async def set_popularity(self, keys: np.ndarray, clicks: np.ndarray, impressions: np.ndarray) -> None:
        """All users' popularity as PostgreSQL holds it (the supervisor reads and pushes it)."""
        if self.state is not None:
            self.state.set_popularity(Popularity(keys, clicks, impressions))

    def status(self) -> dict[str, Any]:
        state = self.state
        return {
            "shard": self.shard_id,
            "ready": state is not None and not self.broken,
            "broken": self.broken,
            "failures": dict(self.failures),
            "pid": os.getpid(),
            "started": self.started,  # which incarnation (a restart makes a new one)
            "slots": len(self.epochs),
            "users": len(state.users) if state else 0,
            "users_evicted": state.evicted if state else 0,
            "users_loaded": self.users_loaded,
            "loads": self.loads,
            "reads_skipped": self.reads_skipped,
            "slots_indexed": len(state.checkpointed.indexed & self._slot_set) if state else 0,
            "covered_seq": self.covered,
            "checkpoint_seq": self._saved_covered,
            "events_applied": state.applied if state else 0,
            "events_duplicate": state.duplicates if state else 0,
            "digests_summed": state.digests_summed if state else 0,
            "unknown_movies": state.unknown_movies if state else 0,
            "dirty_users": len(state.dirty) if state else 0,
            "replayed": self.replayed,
            "gaps": self.gaps,
            "refused_spans": self.refused_spans,
            "lag_buckets": state.lag_counts.tolist() if state else [],
            "lag_seconds": state.lag_seconds if state else 0.0,
            "slate_calls": self.slate_calls,
            "slates_served": self.slates_served,
            "apply_calls": self.apply_calls,
            "checkpoints": self.checkpoints,
            "checkpoint_errors": self.checkpoint_errors,
            "last_checkpoint": self.last_checkpoint,
            "restore_seconds": self.restore_seconds,
            "catalog_version": state.catalog.version if state else None,
            "fenced": self.fenced,
            "erased": self.erased,
            "erasures_scrubbing": len(self._scrubber.running),
            "last_error": self.last_error or self._restoring.last_error,
        }
