"""A background task that an idempotent `ensure` call (re)starts: how actors restore, start
serving or consume without ever making a health check wait."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable


class Background:
    def __init__(self, start: Callable[[], Awaitable[None]]) -> None:
        self._start = start
        self._task: asyncio.Task[None] | None = None
        self.last_error: str | None = None

    def ensure(self) -> None:
        """Start the task unless it is running; a failed one is started again (and its error kept)."""
        if self._task is not None and not self._task.done():
            return
        if self._task is not None and not self._task.cancelled() and self._task.exception():
            self.last_error = repr(self._task.exception())
        self._task = asyncio.create_task(self._start())  # type: ignore[arg-type]

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def wait(self) -> None:
        """Wait for the task (started if need be); its exception, if any, is raised."""
        self.ensure()
        assert self._task is not None
        await asyncio.shield(self._task)

    async def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
