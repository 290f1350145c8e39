"""Publishing events to the event log from a bounded in-memory buffer, many events per message.

One message in flight at a time, not nats-py's asynchronous publishing: the log must keep each
API process's events in the order it recorded them (a user's impression before their click;
decay and `mabrec verify` depend on the order), and a message refused and retried while later
ones landed would reorder them. Throughput comes from packing: a message carries every event
that gathered while the last one was in flight (up to MAX_BATCH), so a busy API sends few large
messages (BENCHMARKS.md: ingestion at 20,000 events/s).
"""

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
from system.core.events import MAX_BATCH
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
# Seconds before a loop that died of a bug starts again: doubled at each death in a row.
RESTART_PAUSE, RESTART_PAUSE_MAX = 0.1, 10.0


@dataclass(slots=True)
class _Unit:
    """One caller's events: stored together, in one message, or not at all."""

    subject: str
    payloads: Sequence[bytes]
    size: int  # bytes, as a JSON array
    done: asyncio.Future[int] | None


@dataclass
class _Message:
    subject: str
    payload: bytes
    msg_id: str
    units: int
    events: int
    attempts: int = 0


class TooLarge(ValueError):
    """Events that cannot go in one message: the caller sends fewer at a time."""


# The most events one message carries: what a reader of the stream takes in one message.
MAX_EVENTS = MAX_BATCH


class Publisher:
    """`submit_many` never blocks a request: it appends to the buffer, or returns False when the
    buffer is full (NATS has been unreachable for a while). `publish` also waits until JetStream
    has the events: a caller that answers "accepted" only then loses nothing if this process dies.

    What one call hands over is a unit: it goes into one JetStream message whole (a unit too large
    for one message is refused: `TooLarge`), so the log holds all of its events or none, and the
    caller hears of the fate of every one of them. A background task drains the buffer: the units
    that gathered while the previous message was being acknowledged (or, after a quiet spell,
    within `linger` seconds) leave as one message, a JSON array of at most MAX_EVENTS events and
    half the server's payload limit. A message is re-sent as it was, with the same Nats-Msg-Id, so
    a re-send after a lost acknowledgement is stored once.
    """

    def __init__(self, nc: NATS, max_buffer: int = 100_000, per_message: int = 500, linger: float = 0.005) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.max_buffer = max_buffer  # events
        self.per_message = min(per_message, MAX_EVENTS)  # events gathered into one message (a unit may have more)
        self.linger = linger
        self._buffer: deque[_Unit] = deque()
        self._events = 0  # in the buffer
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._message: _Message | None = None
        self._restarts = 0
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
        """A bug, not NATS (its errors are handled in the loop): logged already. Started again
        after a pause that grows with each death, so a bug that kills it at once does not spin."""
        self.last_error = repr(exc)
        self._task = None
        pause = min(RESTART_PAUSE * 2**self._restarts, RESTART_PAUSE_MAX)
        self._restarts += 1
        log.error("publisher loop died; restarting it", extra={"pause": pause, "restarts": self._restarts})
        asyncio.get_running_loop().call_later(pause, self.start)

    @property
    def connected(self) -> bool:
        return bool(self.nc.is_connected)

    @property
    def pending(self) -> int:
        """Events waiting to be stored."""
        return self._events

    @property
    def max_bytes(self) -> int:
        """The largest message this publisher sends (half the server's payload limit)."""
        return max(self.nc.max_payload // 2, 1)

    def check(self, payloads: Sequence[bytes]) -> int:
        """The size of `payloads` as one message; TooLarge if they do not fit in one."""
        size = sum(len(p) for p in payloads) + len(payloads) + 1
        if len(payloads) > MAX_EVENTS:
            raise TooLarge(f"at most {MAX_EVENTS} events go together, got {len(payloads)}")
        if size > self.max_bytes:
            raise TooLarge(f"the events take {size} bytes encoded; at most {self.max_bytes} go together")
        return size

    def submit_many(self, subject: str, payloads: Sequence[bytes]) -> bool:
        """Queue encoded events, to be stored together; False when the buffer has no room."""
        return self._enqueue(subject, payloads, None)

    async def publish(self, subject: str, payloads: Sequence[bytes], timeout: float) -> int:
        """Queue and wait until JetStream stored every event (all in one message); Unavailable
        if it cannot in time, or refused them. Returns the stream sequence of their message:
        once a shard has applied the stream that far, it has applied these events."""
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
        size = self.check(payloads)
        if self._events + len(payloads) > self.max_buffer:
            self.rejected += len(payloads)
            return False
        self._buffer.append(_Unit(subject, payloads, size, done))
        self._events += len(payloads)
        self._wakeup.set()
        return True

    def _next_message(self) -> _Message:
        """Whole units from the head of the buffer as one message: one subject, a bounded size."""
        first = self._buffer[0]
        parts: list[bytes] = []
        units = events = 0
        size = 2
        for unit in self._buffer:
            if units and (
                unit.subject != first.subject
                or events + len(unit.payloads) > self.per_message
                or size + unit.size > self.max_bytes
            ):
                break
            parts.extend(unit.payloads)
            units += 1
            events += len(unit.payloads)
            size += unit.size
        body = parts[0] if len(parts) == 1 else b"[" + b",".join(parts) + b"]"
        return _Message(first.subject, body, secrets.token_hex(12), units, events)

    async def _run(self) -> None:
        backoff = 0.1
        while True:
            if not self._buffer:
                self._wakeup.clear()
                await self._wakeup.wait()
                if self.linger and self._events < self.per_message:
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
            self._restarts = 0
            self._settle(message, ack.seq, None)

    def _failed(self, message: _Message, exc: Exception, *, permanent: bool) -> None:
        message.attempts += 1
        self.failures += 1
        self.last_error = repr(exc)
        log.warning(
            "publish failed; will retry" if not permanent or message.attempts < MAX_ATTEMPTS else "publish refused",
            extra={"error": repr(exc), "attempt": message.attempts, "pending": self._events},
        )

    def _settle(self, message: _Message, seq: int, error: Exception | None) -> None:
        """The message left the buffer: stored at `seq` (error None) or dropped for good; every
        unit in it hears which."""
        self._message = None
        self._events -= message.events
        for _ in range(message.units):
            done = self._buffer.popleft().done
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
            log.warning("publisher stopped with events unpublished", extra={"pending": self._events})
        task, self._task = self._task, None
        await cancel_and_wait(task)
