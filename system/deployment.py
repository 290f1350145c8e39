"""`mabrec scale` and `mabrec restart --rolling`: ask the running system for a change (the
desired state, in PostgreSQL, which the supervisor reconciles) and follow it to the end through
the API's status, printing progress."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import httpx

from system.core.errors import BadRequest, Unavailable
from system.core.settings import Settings
from system.db.pool import short_lived_pool
from system.db.state_store import StateStore
from system.local import admin_token
from system.local.runtime import Runtime
from system.status import slots_per_shard

Status = dict[str, Any]


def _running(settings: Settings) -> tuple[Settings, str]:
    runtime = Runtime.load(settings.state_dir)
    if runtime is None:
        raise BadRequest(f"no running system here (no {settings.state_dir}/runtime.json): start one with `mabrec up`")
    return replace(settings, database_url=settings.database_url or runtime.database_url), runtime.api_url


async def scale(settings: Settings, shards: int, timeout: float) -> int:
    """Ask for `shards` shards; return once the slot map has them and no move is under way."""
    settings, api = _running(settings)
    async with short_lived_pool(settings.database_url or "", "scale") as pool:
        await StateStore(pool).set_desired_shards(shards)
    print(f"asked for {shards} shards", file=sys.stderr)

    async def done(status: Status) -> bool:
        owners = status.get("slot_owners") or []
        return len(status["shards"]) == shards and not status.get("change") and max(owners, default=-1) + 1 == shards

    status = await _follow(api, done, timeout)
    print(f"{shards} shards; slots per shard: {slots_per_shard(status)}")
    return 0


async def cancel(settings: Settings) -> int:
    """Give up the change under way, or failing and being tried again: keep the layout as the
    slot map has it now (the shard actors beyond it retire), and no pending rolling restart."""
    settings, api = _running(settings)
    async with short_lived_pool(settings.database_url or "", "scale") as pool:
        store = StateStore(pool)
        layout = await store.slot_map()
        await store.cancel_changes(layout.shards)
    print(f"cancelled: {layout.shards} shards, as the slot map has them", file=sys.stderr)

    async def done(status: Status) -> bool:
        return len(status["shards"]) == layout.shards and not status.get("change")

    await _follow(api, done, 300)
    return 0


async def rolling_restart(settings: Settings, timeout: float) -> int:
    """Ask for every shard to be replaced, one at a time; return once it is done."""
    settings, api = _running(settings)
    async with short_lived_pool(settings.database_url or "", "restart") as pool:
        store = StateStore(pool)
        request = await store.request_restart()
        print(f"rolling restart #{request} asked for", file=sys.stderr)

        async def done(status: Status) -> bool:
            return (await store.deployment()).restart_done >= request

        await _follow(api, done, timeout)
    print("every shard replaced")
    return 0


async def _follow(api: str, done: Callable[[Status], Awaitable[bool]], timeout: float) -> Status:
    """Poll the status, printing each change of progress, until `done(status)`."""
    deadline, last = time.monotonic() + timeout, ""
    following: dict[str, Any] | None = None  # the change under way, as last seen
    async with httpx.AsyncClient(base_url=api, timeout=10, headers=admin_token.headers(api)) as http:
        while True:
            status: Status = (await http.get("/api/status")).json()
            change, failed = status.get("change"), status.get("change_failed")
            if change:
                following = change
            elif following is not None and not failed:  # it finished between two looks: say so
                print(f"{following['what']}: {following['slots']}/{following['slots']} slots moved", file=sys.stderr)
                following = None
            line = (
                f"{change['what']}: {change['moved']}/{change['slots']} slots moved, {change['seconds']} s"
                if change
                else f"{len(status['shards'])} shards, slots per shard {slots_per_shard(status)}"
            )
            if failed and not change:
                line = (
                    f"{failed['what']} FAILED (attempt {failed['attempts']}): {failed['why']}; tried again in"
                    f" {failed['retry_in_seconds']:.0f} s (`mabrec scale --cancel` gives up)"
                )
            if line != last:
                print(line, file=sys.stderr)
                last = line
            if await done(status):
                return status
            if time.monotonic() > deadline:
                raise Unavailable(f"not done within {timeout:g} s: {line}")
            await asyncio.sleep(0.2)
