"""Shard 0 in a process of its own, for the fencing test: `python -m tests.zombie_shard SETTINGS`
(JSON) restores it, prints "ready", serves until a successor fences it, prints "fenced"."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from actors.shard import Shard
from system.core.settings import Settings
from tests.pipeline import restored


async def main(raw: str) -> None:
    values = json.loads(raw)
    settings = Settings(**{**values, "state_dir": Path(values["state_dir"])})
    shard = Shard(0, settings)
    await restored(shard)
    print("ready", flush=True)
    while not shard.fenced:
        await asyncio.sleep(0.05)
    print("fenced", flush=True)
    await shard.stop()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
