"""Erasing a user from the event log, after their shard erased their state (actors/shard.py
`erase`, system/db/erasure_store.py).

The messages that named the user, through the sequence the erasure covers, are deleted from the
stream (JetStream overwrites a deleted message) once every slot's checkpoint covers them, so no
replay or router start reads them again; each is kept in PostgreSQL as a redacted copy
(system/core/events.py `redact`) for `mabrec verify`, which recounts everyone else from them.
Copies redacted by earlier erasures are redacted again, and dead letters that name the user are
deleted. A scrub cut short (a restart, an outage) runs again from the start: every step is
idempotent, and the erasure keeps the user's id until it is done.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import orjson
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from psycopg_pool import AsyncConnectionPool

from system.bus import stream
from system.core.events import redact
from system.core.settings import Settings
from system.db.erasure_store import ErasureStore
from system.db.state_store import StateStore
from system.tasks import start_task

log = logging.getLogger(__name__)

CHECKPOINT_POLL = 0.25  # seconds between looks at the slots' checkpoints
RETRY_MAX = 30.0


async def scrub(
    js: JetStreamContext, settings: Settings, pool: AsyncConnectionPool, erasure: int, uxid: str, through: int
) -> tuple[int, int]:
    """Scrub the log of one erasure. Returns (messages redacted, dead letters deleted)."""
    store, states = ErasureStore(pool), StateStore(pool)
    waiting_since = time.monotonic()
    while (oldest := await states.oldest_checkpoint()) < through:
        if time.monotonic() - waiting_since > 30:
            log.info(
                "erasure waits for every slot's checkpoint",
                extra={"erasure": erasure, "at": oldest, "through": through},
            )
            waiting_since = time.monotonic()
        await asyncio.sleep(CHECKPOINT_POLL)
    messages = 0
    async for batch in stream.read_range(js, settings, 0, through):
        for msg in batch:
            redacted = redact(msg.data, msg.msg_id, uxid)
            if redacted is not None:
                await store.keep_redacted(erasure, msg.seq, msg.second, redacted)
                await _delete(js, settings.stream, msg.seq)
                messages += 1
    for seq, second, data in await store.redacted(0, through):
        again = redact(data, None, uxid)
        if again is not None:
            await store.keep_redacted(erasure, seq, second, again)
            messages += 1
    dead_letters = 0
    dlq = settings.deadletter_stream
    last = await stream.last_seq(js, dlq)
    async for batch in stream.read_range(js, settings, 0, last, name=dlq):
        for msg in batch:
            if _names(msg.data, uxid):
                await _delete(js, dlq, msg.seq)
                dead_letters += 1
    await store.finish(erasure, messages, dead_letters)
    return messages, dead_letters


def _names(payload: bytes, uxid: str) -> bool:
    """Whether a dead letter (an event, or a whole message) names the user."""
    if uxid.encode() in payload:
        return True
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return False
    return uxid in orjson.dumps(data).decode()  # escapes (\u00e9) undone


async def _delete(js: JetStreamContext, name: str, seq: int) -> None:
    try:
        await js.delete_msg(name, seq)  # without no_erase: JetStream overwrites it
    except NotFoundError:
        pass  # deleted by an earlier run of this scrub


class LogScrubber:
    """A shard's scrubs of the log, each retried (logged, backing off) until done."""

    def __init__(
        self, settings: Settings, connections: Callable[[], tuple[JetStreamContext, AsyncConnectionPool]]
    ) -> None:
        self.settings = settings
        self.connections = connections
        self.running: dict[int, asyncio.Task[None]] = {}
        self.done = 0

    def start(self, erasure: int, uxid: str, through: int) -> None:
        if erasure not in self.running:
            self.running[erasure] = start_task(
                self._run(erasure, uxid, through), f"erasure {erasure} log scrub", forever=False
            )

    async def resume(self, owned: Callable[[str], bool]) -> None:
        """Start the pending scrubs of users this shard owns (one cut short by a restart)."""
        _, pool = self.connections()
        for erasure, uxid, through in await ErasureStore(pool).pending():
            if owned(uxid):
                self.start(erasure, uxid, through)

    async def _run(self, erasure: int, uxid: str, through: int) -> None:
        pause = 0.5
        try:
            while True:
                try:
                    js, pool = self.connections()
                    messages, dead_letters = await scrub(js, self.settings, pool, erasure, uxid, through)
                except Exception as exc:  # noqa: BLE001 - NATS or PostgreSQL away: the scrub runs again
                    log.warning(
                        "erasure log scrub failed; retrying",
                        extra={"erasure": erasure, "error": repr(exc), "pause": pause},
                    )
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, RETRY_MAX)
                    continue
                log.info("erasure done", extra={"erasure": erasure, "messages": messages, "dead_letters": dead_letters})
                self.done += 1
                return
        finally:
            self.running.pop(erasure, None)

    async def stop(self) -> None:
        for task in list(self.running.values()):
            task.cancel()
