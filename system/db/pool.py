"""PostgreSQL connection pools."""

from __future__ import annotations

import select
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool


async def check_if_signalled(conn: AsyncConnection) -> None:
    """Check a pooled connection with a round trip only if the server said something while it sat
    idle: a stopped or restarted server's goodbye (or its closed socket) makes the socket
    readable, a healthy idle connection's stays silent. A round trip per checkout was a tenth of
    a shard's CPU under load (BENCHMARKS.md); a connection that dies silently fails its query and
    the pool replaces it. poll, not select: select refuses descriptors >= 1024, which a busy
    process reaches."""
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN)
    if poller.poll(0):
        await AsyncConnectionPool.check_connection(conn)


async def open_pool(url: str, *, min_size: int = 1, max_size: int = 4, name: str = "mabrec") -> AsyncConnectionPool:
    """A pool that opens lazily: a PostgreSQL outage fails calls, not the process."""
    pool = AsyncConnectionPool(
        url,
        min_size=min_size,
        max_size=max_size,
        name=name,
        open=False,
        timeout=5.0,
        reconnect_timeout=0,  # keep trying forever; callers see errors meanwhile
        check=check_if_signalled,  # a restarted server leaves dead connections
        kwargs={"autocommit": True, "connect_timeout": 5, "application_name": name},
    )
    await pool.open(wait=False)
    return pool


@asynccontextmanager
async def short_lived_pool(url: str, name: str) -> AsyncIterator[AsyncConnectionPool]:
    """A one-connection pool for a one-off job (a reload, a command), closed afterwards."""
    pool = await open_pool(url, max_size=1, name=name)
    try:
        yield pool
    finally:
        await pool.close()
