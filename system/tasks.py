"""Background tasks that never die silently, cancellations that are never swallowed, and
concurrent calls whose failures are each logged by name."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


def start_task(
    coro: Coroutine[Any, Any, None],
    name: str,
    on_death: Callable[[BaseException | None], None] | None = None,
    *,
    forever: bool = True,
) -> asyncio.Task[None]:
    """Run `coro` in the background. If it dies (an exception; or, when it should run `forever`,
    a return), the death is logged with its name and `on_death` (if given) decides what happens
    next: restart it, or stop the process. A cancellation is an ordered stop, not a death."""
    task = asyncio.create_task(coro, name=name)

    def ended(task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None and not forever:
            return
        if exc is not None:
            log.error("background task died", extra={"task": name}, exc_info=exc)
        else:
            log.error("background task ended", extra={"task": name})
        if on_death is not None:
            on_death(exc)

    task.add_done_callback(ended)
    return task


# How long a cancelled task may take to stop before it is cancelled again: Python 3.11's
# asyncio.wait_for loses a cancellation that races with its result (gh-86296), and libraries
# (nats-py's next_msg) use it, so a loop can carry on as if never told to stop.
CANCEL_AGAIN_AFTER = 2.0


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel `task` and wait until it has ended (cancelled again, and logged, if it carries on).
    Its own error, if it had one, is logged. If the caller is cancelled meanwhile, that
    cancellation goes on up: it is never swallowed."""
    if task is None or task.done():
        return
    task.cancel()
    while True:
        await asyncio.wait([task], timeout=CANCEL_AGAIN_AFTER)  # raises the caller's own cancellation
        if task.done():
            break
        log.warning("task still running after it was cancelled: cancelling it again", extra={"task": task.get_name()})
        task.cancel()
    if not task.cancelled() and (exc := task.exception()) is not None:
        # It failed while stopping: worth a line, not a crash.
        log.warning("task failed while being cancelled", extra={"task": task.get_name(), "error": repr(exc)})


async def gather_logged(calls: Mapping[str, Awaitable[T]], what: str) -> dict[str, T]:
    """Await `calls` concurrently. Each failure is logged with its key and `what` was being done,
    and left out of the result; the successes come back by key."""
    keys = list(calls)
    results = await asyncio.gather(*calls.values(), return_exceptions=True)
    out: dict[str, T] = {}
    for key, result in zip(keys, results, strict=True):
        if isinstance(result, asyncio.CancelledError):
            raise result
        if isinstance(result, BaseException):
            log.warning(f"{what} failed", extra={"target": key, "error": repr(result)})
        else:
            out[key] = result
    return out


# Seconds before a background task that died may be started again: doubled with each death in
# a row (a bug that kills it at once must not spin), up to the most.
RETRY_PAUSE, RETRY_PAUSE_MAX = 0.5, 30.0


class Background:
    """A background task that an idempotent `ensure` call (re)starts: how actors restore, start
    serving or consume without ever making a health check wait. A task that dies is logged
    when it dies and started again by an `ensure` once a pause has passed (doubled with each
    death in a row); `forever` says whether returning is a death (a loop) or its job done (a
    restore, after which the deaths in a row start from zero)."""

    def __init__(self, start: Callable[[], Coroutine[Any, Any, None]], name: str, *, forever: bool) -> None:
        self._start = start
        self.name = name
        self.forever = forever
        self._task: asyncio.Task[None] | None = None
        self.last_error: str | None = None
        self.deaths = 0  # in a row
        self._not_before = 0.0

    def ensure(self) -> None:
        """Start the task unless it is running, or died too recently to start again yet."""
        if self._task is not None and not self._task.done():
            return
        if time.monotonic() < self._not_before:
            return
        task = self._task = start_task(self._start(), self.name, self._ended, forever=self.forever)
        task.add_done_callback(self._succeeded)

    def _ended(self, exc: BaseException | None) -> None:
        self.last_error = repr(exc) if exc is not None else "ended"
        self.deaths += 1
        pause = min(RETRY_PAUSE * 2 ** (self.deaths - 1), RETRY_PAUSE_MAX)
        self._not_before = time.monotonic() + pause
        log.warning("background task will be started again", extra={"task": self.name, "after_s": pause})

    def _succeeded(self, task: asyncio.Task[None]) -> None:
        if not self.forever and not task.cancelled() and task.exception() is None:
            self.deaths = 0

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def wait(self) -> None:
        """Wait for the task (started if need be); its exception, if any, is raised."""
        self.ensure()
        assert self._task is not None
        await asyncio.shield(self._task)

    async def cancel(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)
