"""The NATS JetStream event bus: streams, a buffered publisher, and an in-order stream cursor.

The events stream is the accepted-event log: every feedback event lands there first, shards apply
it from there, and recovery replays it from the sequence a checkpoint covers. It keeps messages by
limits (age and size, see Settings), never by acknowledgement, so a replay can always re-read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import nats
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from system.errors import Unavailable
from system.settings import Settings

log = logging.getLogger(__name__)

DUPLICATE_WINDOW = 600.0  # seconds in which JetStream drops a re-published Nats-Msg-Id
DEADLETTER_MAX_AGE = 7 * 24 * 3600.0
CONSUMER_CHECK_SECONDS = 3.0


async def connect(url: str, name: str) -> NATS:
    """A connection that reconnects forever: a NATS restart is an outage, not a crash."""

    async def on_error(exc: Exception) -> None:
        log.warning("nats error", extra={"error": repr(exc), "client": name})

    return await nats.connect(
        url,
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        connect_timeout=5,
        error_cb=on_error,
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
            name=f"{settings.stream}_DLQ",
            subjects=[settings.deadletter_subject],
            storage=StorageType.FILE,
            max_age=DEADLETTER_MAX_AGE,
            description="mabrec malformed feedback events, with the reason in a header",
        ),
    ]
    for config in wanted:
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


class StreamCursor:
    """Reads a stream in order from a start sequence, without acknowledgements.

    An ephemeral pull consumer with AckNone: JetStream keeps no per-message state for it, and the
    reader tracks its own position. If a delivery is lost (the consumer sequence jumps) or the
    consumer vanishes (a NATS restart), it recreates the consumer from the next stream sequence.
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
        except (TimeoutError, NatsError) as exc:
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
            out.append(StreamMessage(meta.sequence.stream, msg.data))
        if not msgs:
            await self._check_consumer()
        return out

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
        except (NatsError, TimeoutError):
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
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            with contextlib.suppress(Exception):  # else the server drops it after inactive_threshold
                await self.js.delete_consumer(self.stream, self._consumer)


async def read_range(
    js: JetStreamContext, settings: Settings, after: int, through: int
) -> AsyncIterator[list[StreamMessage]]:
    """Every message with after < seq <= through, in batches (for replays and recounts)."""
    cursor = StreamCursor(js, settings.stream, after + 1)
    try:
        while cursor.next_seq <= through:
            try:
                batch = await cursor.fetch(min(1000, through - cursor.next_seq + 1), timeout=2.0)
            except NatsError:
                await asyncio.sleep(0.2)
                continue
            if batch:
                yield [m for m in batch if m.seq <= through]
                continue
            state = (await js.stream_info(settings.stream)).state
            if cursor.next_seq > state.last_seq:
                return  # asked past the end of the stream
            if cursor.next_seq < state.first_seq:
                # Retention trimmed the start of the range; nothing older exists to read.
                log.warning("replay range trimmed", extra={"from": cursor.next_seq, "first": state.first_seq})
                cursor.next_seq = state.first_seq
                await cursor.close()
    finally:
        await cursor.close()


class Publisher:
    """Publishes events to JetStream from a bounded in-memory buffer, many events per message.

    `submit_many` never blocks a request: it appends to the buffer, or returns False when the
    buffer is full (NATS has been unreachable for a while). `publish` also waits until JetStream
    has the events: a caller that answers "accepted" only then loses nothing if this process dies.

    A background task drains the buffer: what has gathered while the previous message was being
    acknowledged (or, after a quiet spell, within `linger` seconds) leaves as one message, a JSON
    array of up to `per_message` events: a busy API sends few, large messages. Events leave the
    buffer only once JetStream acknowledged their message; a message is re-sent as it was, with
    the same Nats-Msg-Id, so a re-send after a lost acknowledgement is stored once.
    """

    def __init__(self, nc: NATS, max_buffer: int = 100_000, per_message: int = 500, linger: float = 0.005) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.max_buffer = max_buffer
        self.per_message = per_message
        self.linger = linger
        self._buffer: deque[tuple[str, bytes, asyncio.Future[None] | None]] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.published = 0
        self.messages = 0
        self.rejected = 0
        self.failures = 0
        self.last_error: str | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="publisher")

    @property
    def connected(self) -> bool:
        return bool(self.nc.is_connected)

    @property
    def pending(self) -> int:
        return len(self._buffer)

    def submit_many(self, subject: str, payloads: Sequence[bytes]) -> bool:
        """Queue encoded events; all or none (False when the buffer has no room)."""
        return self._enqueue(subject, payloads, None)

    async def publish(self, subject: str, payloads: Sequence[bytes], timeout: float) -> None:
        """Queue and wait until JetStream stored every event; Unavailable if it cannot in time."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if not self._enqueue(subject, payloads, done):
            raise Unavailable("the event buffer is full (NATS is unreachable); retry later")
        try:
            await asyncio.wait_for(asyncio.shield(done), timeout)
        except TimeoutError:
            raise Unavailable(
                "NATS did not confirm the events in time; they stay queued, and a retry with the same event ids counts once"
            ) from None

    def _enqueue(self, subject: str, payloads: Sequence[bytes], done: asyncio.Future[None] | None) -> bool:
        if len(self._buffer) + len(payloads) > self.max_buffer:
            self.rejected += len(payloads)
            return False
        last = len(payloads) - 1
        for i, payload in enumerate(payloads):
            self._buffer.append((subject, payload, done if i == last else None))
        self._wakeup.set()
        return True

    def _next_message(self) -> tuple[str, bytes, str, int]:
        """(subject, payload, msg id, events) from the head of the buffer: one subject per message."""
        subject = self._buffer[0][0]
        count = 0
        for item in self._buffer:
            if item[0] != subject or count == self.per_message:
                break
            count += 1
        payloads = [self._buffer[i][1] for i in range(count)]
        payload = payloads[0] if count == 1 else b"[" + b",".join(payloads) + b"]"
        return subject, payload, secrets.token_hex(12), count

    async def _run(self) -> None:
        backoff = 0.1
        message: tuple[str, bytes, str, int] | None = None
        while True:
            if not self._buffer:
                self._wakeup.clear()
                await self._wakeup.wait()
                if self.linger and len(self._buffer) < self.per_message:
                    await asyncio.sleep(self.linger)  # let a few more events join this message
            message = message or self._next_message()
            subject, payload, msg_id, count = message
            try:
                await self.js.publish(subject, payload, timeout=5.0, headers={"Nats-Msg-Id": msg_id})
            except (NatsError, TimeoutError, OSError) as exc:
                self.failures += 1
                self.last_error = repr(exc)
                log.warning("publish failed; will retry", extra={"error": repr(exc), "pending": len(self._buffer)})
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue  # the same message again, with the same Nats-Msg-Id
            backoff = 0.1
            message = None
            for _ in range(count):
                done = self._buffer.popleft()[2]
                if done is not None and not done.done():
                    done.set_result(None)
            self.published += count
            self.messages += 1

    def status(self) -> dict[str, Any]:
        return {
            "connected": self.connected,
            "pending": self.pending,
            "published": self.published,
            "messages": self.messages,
            "rejected": self.rejected,
            "failures": self.failures,
            "last_error": self.last_error,
        }

    async def drain(self, timeout: float = 5.0) -> None:
        """Wait (bounded) until everything submitted was acknowledged, then stop."""
        deadline = time.monotonic() + timeout
        while self._buffer and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
