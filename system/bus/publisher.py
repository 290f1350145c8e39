"""Publishing events to the event log from a bounded in-memory buffer, many events per message."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from nats.aio.client import Client as NATS
from nats.errors import (
    ConnectionClosedError,
    ConnectionReconnectingError,
    NoRespondersError,
    OutboundBufferLimitError,
    StaleConnectionError,
)
from nats.errors import TimeoutError as NatsTimeout

from system.core.errors import Unavailable
from system.tasks import cancel_and_wait, start_task

log = logging.getLogger(__name__)

# Errors that say "NATS is not there right now": retried for as long as it takes (the buffer is
# bounded, so a long outage refuses new events rather than growing).
TRANSIENT = (
    NatsTimeout,
    TimeoutError,
    ConnectionClosedError,
    ConnectionReconnectingError,
    StaleConnectionError,
    NoRespondersError,
    OutboundBufferLimitError,
    OSError,
)
# Any other error is retried this many times, then the message's events are dropped and counted.
MAX_ATTEMPTS = 5


@dataclass
class _Message:
    subject: str
    payload: bytes
    msg_id: str
    events: int
    attempts: int = 0


class Publisher:
    """`submit_many` never blocks a request: it appends to the buffer, or returns False when the
    buffer is full (NATS has been unreachable for a while). `publish` also waits until JetStream
    has the events: a caller that answers "accepted" only then loses nothing if this process dies.

    A background task drains the buffer: what has gathered while the previous message was being
    acknowledged (or, after a quiet spell, within `linger` seconds) leaves as one message, a JSON
    array of up to `per_message` events and at most half the server's payload limit. Events
    leave the buffer once JetStream acknowledged their message; a message is re-sent as it was,
    with the same Nats-Msg-Id, so a re-send after a lost acknowledgement is stored once.
    """

    def __init__(self, nc: NATS, max_buffer: int = 100_000, per_message: int = 500, linger: float = 0.005) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.max_buffer = max_buffer
        self.per_message = per_message
        self.linger = linger
        self._buffer: deque[tuple[str, bytes, asyncio.Future[int] | None]] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._message: _Message | None = None
        self.published = 0
        self.messages = 0
        self.rejected = 0
        self.dropped = 0
        self.failures = 0
        self.last_error: str | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = start_task(self._run(), "publisher", self._died)

    def _died(self, exc: BaseException | None) -> None:
        """A bug, not NATS (its errors are handled in the loop): logged already; carry on."""
        self.last_error = repr(exc)
        self._task = None
        self.start()

    @property
    def connected(self) -> bool:
        return bool(self.nc.is_connected)

    @property
    def pending(self) -> int:
        return len(self._buffer)

    def submit_many(self, subject: str, payloads: Sequence[bytes]) -> bool:
        """Queue encoded events; all or none (False when the buffer has no room)."""
        return self._enqueue(subject, payloads, None)

    async def publish(self, subject: str, payloads: Sequence[bytes], timeout: float) -> int:
        """Queue and wait until JetStream stored every event; Unavailable if it cannot in time.
        Returns the stream sequence of the message holding the last of them: once a shard has
        applied the stream that far, it has applied these events."""
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        if not self._enqueue(subject, payloads, done):
            raise Unavailable("the event buffer is full (NATS is unreachable); retry later")
        try:
            return await asyncio.wait_for(asyncio.shield(done), timeout)
        except TimeoutError:
            raise Unavailable(
                "NATS did not confirm the events in time; they stay queued, and a retry with the same event ids counts once"
            ) from None

    def _enqueue(self, subject: str, payloads: Sequence[bytes], done: asyncio.Future[int] | None) -> bool:
        if len(self._buffer) + len(payloads) > self.max_buffer:
            self.rejected += len(payloads)
            return False
        last = len(payloads) - 1
        for i, payload in enumerate(payloads):
            self._buffer.append((subject, payload, done if i == last else None))
        self._wakeup.set()
        return True

    def _next_message(self) -> _Message:
        """The head of the buffer as one message: one subject, a bounded size."""
        subject = self._buffer[0][0]
        room = max(self.nc.max_payload // 2, 1)
        payloads: list[bytes] = []
        size = 2
        for item_subject, payload, _ in self._buffer:
            if item_subject != subject or len(payloads) == self.per_message:
                break
            if payloads and size + len(payload) + 1 > room:
                break
            payloads.append(payload)
            size += len(payload) + 1
        body = payloads[0] if len(payloads) == 1 else b"[" + b",".join(payloads) + b"]"
        return _Message(subject, body, secrets.token_hex(12), len(payloads))

    async def _run(self) -> None:
        backoff = 0.1
        while True:
            if not self._buffer:
                self._wakeup.clear()
                await self._wakeup.wait()
                if self.linger and len(self._buffer) < self.per_message:
                    await asyncio.sleep(self.linger)  # let a few more events join this message
            message = self._message = self._message or self._next_message()
            try:
                ack = await self.js.publish(
                    message.subject, message.payload, timeout=5.0, headers={"Nats-Msg-Id": message.msg_id}
                )
            except TRANSIENT as exc:
                self._failed(message, exc, permanent=False)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue  # the same message again, with the same Nats-Msg-Id
            except Exception as exc:  # noqa: BLE001 - refused by JetStream: retried a few times, then dropped
                self._failed(message, exc, permanent=True)
                if message.attempts >= MAX_ATTEMPTS:
                    self._settle(message, 0, Unavailable(f"JetStream refused the events: {exc!r}"))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            backoff = 0.1
            self._settle(message, ack.seq, None)

    def _failed(self, message: _Message, exc: Exception, *, permanent: bool) -> None:
        message.attempts += 1
        self.failures += 1
        self.last_error = repr(exc)
        log.warning(
            "publish failed; will retry" if not permanent or message.attempts < MAX_ATTEMPTS else "publish refused",
            extra={"error": repr(exc), "attempt": message.attempts, "pending": len(self._buffer)},
        )

    def _settle(self, message: _Message, seq: int, error: Exception | None) -> None:
        """The message left the buffer: stored at `seq` (error None) or dropped for good."""
        self._message = None
        for _ in range(message.events):
            done = self._buffer.popleft()[2]
            if done is not None and not done.done():
                if error is None:
                    done.set_result(seq)
                else:
                    done.set_exception(error)
        if error is None:
            self.published += message.events
            self.messages += 1
        else:
            self.dropped += message.events
            log.error("events dropped: JetStream refused them", extra={"events": message.events, "error": repr(error)})

    def status(self) -> dict[str, Any]:
        return {
            "connected": self.connected,
            "pending": self.pending,
            "published": self.published,
            "messages": self.messages,
            "rejected": self.rejected,
            "dropped": self.dropped,
            "failures": self.failures,
            "last_error": self.last_error,
        }

    async def drain(self, timeout: float = 5.0) -> None:
        """Wait (bounded) until everything submitted was acknowledged, then stop."""
        deadline = time.monotonic() + timeout
        while self._buffer and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self._buffer:
            log.warning("publisher stopped with events unpublished", extra={"pending": len(self._buffer)})
        task, self._task = self._task, None
        await cancel_and_wait(task)
