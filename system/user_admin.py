"""`mabrec user erase UXID`: erase a user through the admin API of the system started from this
directory (or MABREC_API_URL), and follow the log scrub until it is done."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import Any
from urllib.parse import quote

import httpx

from system.core.settings import Settings
from system.local import admin_token
from system.local.runtime import Runtime


def api_url(settings: Settings) -> str | None:
    runtime = Runtime.load(settings.state_dir)
    return os.environ.get("MABREC_API_URL") or (runtime.api_url if runtime else None)


async def erase(settings: Settings, uxid: str, wait: bool, timeout: float) -> int:
    api = api_url(settings)
    if api is None:
        print("mabrec user erase: no running system here (`mabrec up`) and no MABREC_API_URL", file=sys.stderr)
        return 2
    async with httpx.AsyncClient(base_url=api, timeout=30, headers=admin_token.headers(api, settings)) as http:
        answer = await http.delete(f"/api/users/{quote(uxid, safe='')}")
        if answer.status_code != 202:
            print(f"mabrec user erase: {answer.status_code} {answer.json().get('detail')}", file=sys.stderr)
            return 1
        erased: dict[str, Any] = answer.json()
        print(
            f"erased {uxid!r}: state gone (in memory: {'yes' if erased['in_memory'] else 'no'}, checkpointed:"
            f" {'yes' if erased['checkpointed'] else 'no'}); erasure {erased['erasure']} scrubs the event log"
            f" through #{erased['through_seq']}",
            file=sys.stderr,
        )
        if not wait:
            return 0
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            listed = (await http.get("/api/admin/erasures")).json()["erasures"]
            mine = next((e for e in listed if e["erasure"] == erased["erasure"]), None)
            if mine is not None and mine["log"] == "scrubbed":
                print(
                    f"event log scrubbed: {mine['messages_redacted']} messages redacted,"
                    f" {mine['dead_letters_deleted']} dead letters deleted",
                    file=sys.stderr,
                )
                return 0
            await asyncio.sleep(0.5)
    print(f"mabrec user erase: the log scrub is not done within {timeout:g} s (it goes on)", file=sys.stderr)
    return 1
