"""Adaptive micro-batching: concurrent requests to one destination share one call.

While a call is in flight, new requests queue up; when it returns, everything queued leaves in
the next call. With `linger`, a call also waits that long for company before it leaves. An idle
system pays at most `linger`; a busy one makes fewer, larger calls: a call's fixed cost (a Ray
actor call, a NATS request; BENCHMARKS.md) is paid once per batch, which is what lifts the
request ceiling.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

Key = TypeVar("Key")
Req = TypeVar("Req")
Resp = TypeVar("Resp")


class Batcher(Generic[Req, Resp]):
    def __init__(
        self,
        call: Callable[[Sequence[Req]], Awaitable[Sequence[Resp]]],
        *,
        max_batch: int = 256,
        max_in_flight: int = 1,
        linger: float = 0.0,
    ) -> None:
        self._call = call
        self.max_batch = max_batch
        self.max_in_flight = max_in_flight
        self.linger = linger
        self._lingering = False
        self._queue: deque[tuple[Req, asyncio.Future[Resp]]] = deque()
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self.calls = 0
        self.items = 0

    async def submit(self, item: Req) -> Resp:
        future: asyncio.Future[Resp] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        self._kick()
        return await future

    def _kick(self) -> None:
        """A request arrived: send it now, or after `linger` to let others join."""
        if self._in_flight >= self.max_in_flight or self._lingering:
            return  # it leaves with the next call
        if self.linger and len(self._queue) < self.max_batch:
            self._lingering = True
            asyncio.get_running_loop().call_later(self.linger, self._linger_done)
            return
        self._dispatch()

    def _linger_done(self) -> None:
        self._lingering = False
        self._dispatch()

    def _dispatch(self) -> None:
        while self._queue and self._in_flight < self.max_in_flight:
            batch = [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]
            self._in_flight += 1
            task = asyncio.create_task(self._send(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[tuple[Req, asyncio.Future[Resp]]]) -> None:
        self.calls += 1
        self.items += len(batch)
        try:
            results = await self._call([item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"batched call returned {len(results)} results for {len(batch)} requests")
        except BaseException as exc:  # every waiter learns of the failure; none hangs
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc if isinstance(exc, Exception) else RuntimeError(repr(exc)))
            if not isinstance(exc, Exception):
                raise
        else:
            for (_, future), result in zip(batch, results, strict=False):
                if not future.done():
                    future.set_result(result)
        finally:
            self._in_flight -= 1
            if not self._lingering:
                self._dispatch()  # what queued meanwhile has waited enough


class Batchers(Generic[Key, Req, Resp]):
    """One Batcher per destination (a shard), made on first use: concurrent requests to the same
    destination share calls, requests to different ones never wait for each other."""

    def __init__(
        self, call: Callable[[Key, Sequence[Req]], Awaitable[Sequence[Resp]]], *, linger: float, max_in_flight: int
    ) -> None:
        self._call = call
        self.linger = linger
        self.max_in_flight = max_in_flight
        self._batchers: dict[Key, Batcher[Req, Resp]] = {}

    def __getitem__(self, key: Key) -> Batcher[Req, Resp]:
        batcher = self._batchers.get(key)
        if batcher is None:
            batcher = self._batchers[key] = Batcher(
                lambda items: self._call(key, items), linger=self.linger, max_in_flight=self.max_in_flight
            )
        return batcher

    async def submit(self, key: Key, item: Req) -> Resp:
        return await self[key].submit(item)
