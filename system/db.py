"""PostgreSQL: connection pools and the numbered migrations in sql/ (applied once, in order)."""

from __future__ import annotations

import logging
from pathlib import Path

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

log = logging.getLogger(__name__)

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"
# Any constant works; it serializes concurrent migrators (two supervisors starting at once).
MIGRATION_LOCK = 4_072_011


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
        check=AsyncConnectionPool.check_connection,  # a restarted server leaves dead connections
        kwargs={"autocommit": True, "connect_timeout": 5, "application_name": name},
    )
    await pool.open(wait=False)
    return pool


def migrations() -> list[tuple[int, Path]]:
    found = []
    for path in sorted(SQL_DIR.glob("[0-9][0-9][0-9]_*.sql")):
        found.append((int(path.name[:3]), path))
    return found


async def migrate(url: str, through: int | None = None) -> list[int]:
    """Apply the migrations not yet applied (up to `through`, if given); returns their numbers.
    Idempotent and concurrency-safe."""
    applied_now = []
    async with await AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
        try:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            cur = await conn.execute("SELECT version FROM schema_migrations")
            done = {row[0] for row in await cur.fetchall()}
            for version, path in migrations():
                if version in done or (through is not None and version > through):
                    continue
                async with conn.transaction():
                    await conn.execute(path.read_text())
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)", (version, path.name)
                    )
                applied_now.append(version)
                log.info("applied migration", extra={"migration": path.name})
        finally:
            await conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))
    return applied_now
