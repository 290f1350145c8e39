from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from system.batching import Batcher


async def test_concurrent_requests_share_calls() -> None:
    calls: list[list[int]] = []

    async def call(items: Sequence[int]) -> list[int]:
        calls.append(list(items))
        await asyncio.sleep(0.01)
        return [i * 2 for i in items]

    batcher: Batcher[int, int] = Batcher(call)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(100)))
    assert results == [i * 2 for i in range(100)]
    assert len(calls) == 2 and calls[0] == [0] and calls[1] == list(range(1, 100))
    assert await batcher.submit(7) == 14  # idle again: goes out at once


async def test_a_failed_call_fails_its_batch_only() -> None:
    async def call(items: Sequence[int]) -> list[int]:
        await asyncio.sleep(0.005)
        if 13 in items:
            raise ValueError("unlucky")
        return list(items)

    batcher: Batcher[int, int] = Batcher(call, max_batch=4)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(20)), return_exceptions=True)
    failed = [i for i, r in enumerate(results) if isinstance(r, ValueError)]
    assert 13 in failed and len(failed) <= 4
    assert all(r == i for i, r in enumerate(results) if i not in failed)


async def test_wrong_result_count_is_an_error() -> None:
    async def call(items: Sequence[int]) -> list[int]:
        return []

    with pytest.raises(RuntimeError, match="0 results for 1"):
        await Batcher(call).submit(1)


async def test_linger_gathers_requests_that_arrive_close_together() -> None:
    """Three requests a few event-loop turns apart (no clock in between): the first waits out
    the linger, and the others leave with it, in one call."""
    calls: list[list[int]] = []

    async def call(items: Sequence[int]) -> list[int]:
        calls.append(list(items))
        return list(items)

    batcher: Batcher[int, int] = Batcher(call, linger=0.5)  # far longer than a few loop turns
    waiting = []
    for i in range(3):
        waiting.append(asyncio.ensure_future(batcher.submit(i)))
        await asyncio.sleep(0)  # one turn of the loop: the request is queued
    assert calls == []  # lingering for company
    assert await asyncio.gather(*waiting) == [0, 1, 2]
    assert calls == [[0, 1, 2]]  # one call, not three
