"""`mabrec bench click`: how soon a click changes the user's next slate, under background load.

While an open-loop load runs, a probe user opens a movie and polls its profile until the click
is in the shard's state, which is what the user's next slate is computed from; the latency runs
from the start of the click request. A fresh user per probe, so every probe measures one click.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np

from bench import loadtest
from system.local import admin_token


async def click_to_state(
    api_url: str,
    *,
    probes: int = 200,
    background_rate: float = 1000.0,
    movie_ids: list[int],
    poll: float = 0.002,
    progress: Callable[[float], None] | None = None,
) -> dict[str, Any]:
    rng = np.random.default_rng(1)
    duration = probes * 0.06 + 5
    background = asyncio.create_task(
        loadtest.run(api_url, rate=background_rate, clients=64, duration=duration, warmup=1.0, movie_ids=movie_ids)
    )
    await asyncio.sleep(1.5)
    latencies = []
    tag = secrets.token_hex(3)
    async with httpx.AsyncClient(
        base_url=api_url, headers=admin_token.headers(api_url), timeout=10, limits=httpx.Limits(max_connections=2)
    ) as http:
        for i in range(probes):
            uxid = f"probe-{tag}-{i}"
            movie = int(movie_ids[int(rng.integers(len(movie_ids)))])
            began = time.perf_counter()
            (await http.get(f"/api/movies/{movie}", headers={"uxid": uxid})).raise_for_status()
            while (await http.get("/api/profile", headers={"uxid": uxid})).json()["clicks"] < 1:
                if time.perf_counter() - began > 5:
                    break
                await asyncio.sleep(poll)
            latencies.append(time.perf_counter() - began)
            if progress:
                progress((i + 1) / probes)
            await asyncio.sleep(0.05)
    results = await background
    lat = np.array(latencies) * 1e3
    return {
        "probes": probes,
        "background": {k: v.as_dict() for k, v in results.items()},
        "click_to_state_ms": {f"p{q}": round(float(np.percentile(lat, q)), 1) for q in (50, 90, 99)}
        | {"max": round(float(lat.max()), 1)},
    }
