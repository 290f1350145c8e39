"""Background tasks: a death is logged and handled, a cancellation is never swallowed."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from system import tasks
from system.tasks import Background, cancel_and_wait, gather_logged, start_task


async def test_cancel_and_wait_passes_the_callers_own_cancellation_on() -> None:
    """The bug behind a stop that never finished: awaiting a cancelled task inside
    `suppress(CancelledError)` also swallows the cancellation of the one who awaits."""
    stubborn_started, stopping, may_stop = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def stubborn() -> None:
        stubborn_started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            stopping.set()
            await may_stop.wait()  # takes a while to stop
            raise

    job = asyncio.create_task(stubborn())
    await stubborn_started.wait()
    stopper = asyncio.create_task(cancel_and_wait(job))
    await stopping.wait()  # the stopper waits for the job to stop
    stopper.cancel()  # whoever stops the job is itself told to stop
    with pytest.raises(asyncio.CancelledError):
        await stopper
    may_stop.set()
    await asyncio.wait([job])
    assert job.cancelled()


async def test_cancel_and_wait_cancels_again_a_task_that_lost_its_cancellation(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What Python 3.11's wait_for does when a result races the cancellation (gh-86296): the
    loop carries on. A router paused that way kept routing until its caller timed out."""
    monkeypatch.setattr("system.tasks.CANCEL_AGAIN_AFTER", 0.05)
    rounds = 0

    async def loses_one_cancellation() -> None:
        nonlocal rounds
        while True:
            rounds += 1
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                if rounds > 1_000:
                    raise
                asyncio.current_task().uncancel()  # type: ignore[union-attr]
                rounds = 1_000  # the next cancellation is kept

    job = asyncio.create_task(loses_one_cancellation(), name="forgetful")
    while rounds == 0:
        await asyncio.sleep(0)  # it runs
    with caplog.at_level(logging.WARNING):
        await asyncio.wait_for(cancel_and_wait(job), 5)
    assert job.cancelled()
    assert any(
        "cancelling it again" in r.getMessage() and getattr(r, "task", None) == "forgetful" for r in caplog.records
    )


async def test_cancel_and_wait_logs_a_task_that_fails_while_stopping(caplog: pytest.LogCaptureFixture) -> None:
    async def fails_on_cancel() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            raise RuntimeError("cleanup failed") from None

    job = asyncio.create_task(fails_on_cancel(), name="flaky")
    await asyncio.sleep(0)
    with caplog.at_level(logging.WARNING):
        await cancel_and_wait(job)
    assert any(getattr(r, "task", None) == "flaky" for r in caplog.records)


async def test_a_dead_background_task_is_logged_and_handed_to_its_keeper(caplog: pytest.LogCaptureFixture) -> None:
    deaths: list[BaseException | None] = []

    async def crash() -> None:
        raise ValueError("boom")

    async def quit_early() -> None:
        return

    with caplog.at_level(logging.ERROR):
        started = [
            start_task(crash(), "crasher", deaths.append),
            start_task(quit_early(), "quitter", deaths.append),  # a loop that returned: also a death
            start_task(quit_early(), "one-shot", deaths.append, forever=False),  # its job done: not one
        ]
        await asyncio.wait(started)  # (their keepers' callbacks ran first: registered first)
    assert [type(d).__name__ for d in deaths] == ["ValueError", "NoneType"]
    assert {getattr(r, "task", None) for r in caplog.records} == {"crasher", "quitter"}


async def test_background_is_started_again_after_a_pause_that_grows_with_each_death(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(tasks, "RETRY_PAUSE", 0.05)
    runs: list[float] = []

    async def job() -> None:
        runs.append(time.monotonic())
        if len(runs) <= 2:
            raise OSError("fails twice")

    background = Background(job, "job", forever=False)
    with pytest.raises(OSError):
        await background.wait()
    assert background.last_error == "OSError('fails twice')" and not background.running
    background.ensure()
    assert len(runs) == 1  # too soon: not started again yet
    deadline = time.monotonic() + 10
    while len(runs) < 3 and time.monotonic() < deadline:
        background.ensure()
        await asyncio.sleep(0.005)
    while background.running:
        await asyncio.sleep(0.005)
    assert len(runs) == 3 and background.deaths == 0  # its job done: the deaths in a row start anew
    assert runs[1] - runs[0] >= 0.05 and runs[2] - runs[1] >= 0.1  # each pause twice the last


async def test_gather_logged_names_each_failure_and_keeps_the_rest(caplog: pytest.LogCaptureFixture) -> None:
    async def ok(x: int) -> int:
        return x

    async def bad() -> int:
        raise KeyError("missing")

    with caplog.at_level(logging.WARNING):
        out = await gather_logged({"a": ok(1), "b": bad(), "c": ok(3)}, "asking")
    assert out == {"a": 1, "c": 3}
    [record] = caplog.records
    assert record.getMessage() == "asking failed" and getattr(record, "target", None) == "b"
