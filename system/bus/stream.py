"""The NATS JetStream event log: the connection, the streams, and reading them in order.

The events stream is the accepted-event log: every feedback event lands there first, shards apply
it from there, and recovery replays it from the sequence a checkpoint covers. It keeps messages by
limits (age and size, see Settings), never by acknowledgement, so a replay can always re-read.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Container
from dataclasses import dataclass
from typing import Any

import nats
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from system.core import access
from system.core.errors import Unavailable
from system.core.events import Event, Problem, decode
from system.core.settings import Settings

log = logging.getLogger(__name__)

DUPLICATE_WINDOW = 600.0  # seconds in which JetStream drops a re-published Nats-Msg-Id
DEADLETTER_MAX_AGE = 7 * 24 * 3600.0
CONSUMER_CHECK_SECONDS = 3.0


async def connect(url: str, name: str, user: str = access.MABREC) -> NATS:
    """A connection that reconnects forever: a NATS restart is an outage, not a crash. `user` is
    the NATS user `url` logs in as (system/core/access.py): the replies to its requests come on
    that user's own inbox prefix, where no other user may listen."""

    async def on_error(exc: Exception) -> None:
        log.warning("nats error", extra={"error": repr(exc), "client": name})

    return await nats.connect(
        url,
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        connect_timeout=5,
        error_cb=on_error,
        inbox_prefix=access.inbox_prefix(user),
    )


async def ensure_streams(js: JetStreamContext, settings: Settings) -> None:
    """Create the events and dead-letter streams if missing (idempotent; file storage)."""
    wanted = [
        StreamConfig(
            name=settings.stream,
            subjects=[settings.events_subject, f"{settings.events_subject}.>"],
            storage=StorageType.FILE,
            duplicate_window=DUPLICATE_WINDOW,
            max_age=settings.event_retention or None,
            description="mabrec feedback events: the accepted-event log",
        ),
        StreamConfig(
            name=settings.deadletter_stream,
            subjects=[settings.deadletter_subject],
            storage=StorageType.FILE,
            max_age=DEADLETTER_MAX_AGE,
            description="mabrec malformed feedback events, with the reason in a header",
        ),
    ]
    for config in wanted:
        assert config.name is not None
        try:
            await js.stream_info(config.name)
        except NotFoundError:
            await js.add_stream(config)
            log.info("created stream", extra={"stream": config.name})


async def last_seq(js: JetStreamContext, stream: str) -> int:
    return (await js.stream_info(stream)).state.last_seq


@dataclass(frozen=True, slots=True)
class StreamMessage:
    seq: int
    data: bytes
    second: int  # when JetStream stored it (epoch seconds): the de-duplication window's clock
    msg_id: str | None = None  # its Nats-Msg-Id header, if the publisher set one

    def decode(self, known: Container[int] | None = None) -> tuple[list[Event], list[Problem]]:
        """Its events (ids given to those without, from the Nats-Msg-Id), or none and why
        (all or nothing; with `known`, the catalog's movie ids, an unknown movie refuses it too)."""
        return decode(self.data, self.msg_id, known)


class StreamCursor:
    """Reads a stream in order from a start sequence, without acknowledgements.

    An ephemeral pull consumer with AckNone: JetStream keeps no per-message state for it, and the
    reader tracks its own position. If a delivery is lost (the consumer sequence jumps) or the
    consumer vanishes (a NATS restart), it recreates the consumer from the next stream sequence.

    Why not nats-py's ordered consumer, which recovers from gaps the same way: it is push-based.
    The router reads at its own pace, in batches of up to 1,000 (each a span per shard), and stops
    reading while routing is paused for a re-shard; a push consumer delivers at the server's pace
    into the client's buffer, so pausing means unsubscribing and resuming means re-creating it
    from a position: what this class does anyway, with the batch size under our control.
    """

    def __init__(self, js: JetStreamContext, stream: str, start_seq: int) -> None:
        self.js, self.stream = js, stream
        self.next_seq = max(start_seq, 1)
        self._sub: Any = None
        self._consumer = ""
        self._consumer_seq = 0
        self._checked = time.monotonic()

    async def fetch(self, batch: int = 1000, timeout: float = 1.0) -> list[StreamMessage]:
        """Up to `batch` messages in stream order; [] when the stream has nothing new."""
        if self._sub is None:
            await self._open()
        try:
            msgs = await self._sub.fetch(batch, timeout=timeout)
        except NatsTimeout:
            msgs = []
        except TimeoutError as exc:
            # An idle fetch can also time out as a bare TimeoutError (its request to the server):
            # normal on a quiet stream, not a fault. Read again on a fresh consumer.
            log.debug("idle fetch timed out; reopening the cursor", extra={"stream": self.stream, "error": repr(exc)})
            await self.close()
            return []
        except NatsError as exc:
            log.warning("stream cursor reset", extra={"stream": self.stream, "error": repr(exc)})
            await self.close()
            raise
        out = []
        for msg in msgs:
            meta = msg.metadata
            if meta.sequence.consumer != self._consumer_seq + 1 or meta.sequence.stream < self.next_seq:
                # A gap in delivery: drop what follows and re-read from our own position.
                await self.close()
                break
            self._consumer_seq = meta.sequence.consumer
            self.next_seq = meta.sequence.stream + 1
            headers = msg.headers
            msg_id = headers.get("Nats-Msg-Id") if headers else None
            out.append(StreamMessage(meta.sequence.stream, msg.data, int(meta.timestamp.timestamp()), msg_id))
        if not msgs:
            await self._check_consumer()
        return out

    async def drained(self) -> bool:
        """Whether nothing is left to deliver from `next_seq` on: messages deleted from the
        stream (an erased user's) leave holes that are never delivered. Not while a delivery is
        on its way (or lost: a fetch that timed out as it came), which the next fetch sees."""
        if self._sub is None:
            return False
        info = await self.js.consumer_info(self.stream, self._consumer)
        delivered = info.delivered.consumer_seq if info.delivered else 0
        return info.num_pending == 0 and delivered == self._consumer_seq

    async def _check_consumer(self) -> None:
        """Idle is normal, but a NATS restart also looks idle: it drops ephemeral consumers.
        Every few idle seconds, make sure ours still exists; recreate it if not."""
        now = time.monotonic()
        if now - self._checked < CONSUMER_CHECK_SECONDS:
            return
        self._checked = now
        try:
            await self.js.consumer_info(self.stream, self._consumer)
        except NotFoundError:
            log.warning(
                "stream cursor lost its consumer; recreating", extra={"stream": self.stream, "at": self.next_seq}
            )
            await self.close()
        except (NatsError, TimeoutError) as exc:
            log.warning("stream cursor cannot check its consumer; recreating", extra={"error": repr(exc)})
            await self.close()

    async def _open(self) -> None:
        config = ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=self.next_seq,
            ack_policy=AckPolicy.NONE,
            inactive_threshold=60.0,
            max_waiting=16,
        )
        # No filter subject: the whole stream (NATS 2.9 allows one filter, and the stream has two
        # subjects: the documented one and the ones below it).
        info = await self.js.add_consumer(self.stream, config)
        self._consumer = info.name
        self._sub = await self.js.pull_subscribe_bind(info.name, stream=self.stream)
        self._consumer_seq = 0

    async def close(self) -> None:
        sub, self._sub = self._sub, None
        if sub is None:
            return
        try:
            await sub.unsubscribe()
            await self.js.delete_consumer(self.stream, self._consumer)
        except (NatsError, TimeoutError) as exc:
            # NATS is down or the consumer is gone already: the server drops it after its
            # inactive_threshold anyway.
            log.info("stream cursor closed uncleanly", extra={"consumer": self._consumer, "error": repr(exc)})


async def read_range(
    js: JetStreamContext,
    settings: Settings,
    after: int,
    through: int,
    give_up_after: float = 30.0,
    name: str | None = None,
) -> AsyncIterator[list[StreamMessage]]:
    """Every message with after < seq <= through, in batches (for replays and recounts), of the
    events stream (or the stream `name`).

    NATS errors are retried with a growing pause, each one logged; after `give_up_after` seconds
    without progress it raises Unavailable (the caller's own retry, with its lock released, is
    the next attempt)."""
    name = name or settings.stream
    cursor = StreamCursor(js, name, after + 1)
    backoff, stalled_since = 0.2, time.monotonic()
    try:
        while cursor.next_seq <= through:
            try:
                batch = await cursor.fetch(min(1000, through - cursor.next_seq + 1), timeout=2.0)
                if not batch:
                    state = (await js.stream_info(name)).state
                    drained = await cursor.drained()
            except (NatsError, TimeoutError) as exc:
                if time.monotonic() - stalled_since > give_up_after:
                    raise Unavailable(f"cannot read stream {name} at #{cursor.next_seq}: {exc!r}") from exc
                log.warning("stream read failed; retrying", extra={"at": cursor.next_seq, "error": repr(exc)})
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            backoff, stalled_since = 0.2, time.monotonic()
            if batch:
                yield [m for m in batch if m.seq <= through]
                continue
            if cursor.next_seq > state.last_seq or drained:
                return  # asked past the end of the stream, or the rest of the range was deleted
            if cursor.next_seq < state.first_seq:
                # Retention trimmed the start of the range; nothing older exists to read.
                log.warning("replay range trimmed", extra={"from": cursor.next_seq, "first": state.first_seq})
                cursor.next_seq = state.first_seq
                await cursor.close()
    finally:
        await cursor.close()
