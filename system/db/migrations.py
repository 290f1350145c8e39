"""The numbered migrations in sql/, applied once each, in order, on every start."""

from __future__ import annotations

import logging
from pathlib import Path

from psycopg import AsyncConnection

log = logging.getLogger(__name__)

SQL_DIR = Path(__file__).resolve().parents[2] / "sql"
# Any constant works; it serializes concurrent migrators (two supervisors starting at once).
MIGRATION_LOCK = 4_072_011


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
