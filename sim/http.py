"""`mabrec simulate --url`: the same synthetic users, against a running service over HTTP.

Each round every user asks the API for a slate (their uxid header), reacts as the World says,
and if they click, opens the movie with the slate's recommendation id; if they browse, they
open the catalog movie they chose. The service learns from those requests exactly as from real
users (events through NATS into the shards), so this measures the deployed system.
"""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import httpx
import numpy as np

from sim.runner import shipped_catalog
from sim.world import World


async def run_http(
    url: str, *, users: int = 100, rounds: int = 20, seed: int = 0, concurrency: int = 16
) -> dict[str, Any]:
    catalog = shipped_catalog()
    world = World(catalog, users, seed)
    tag = secrets.token_hex(3)
    everyone = np.arange(users)
    ctr, empty = [], 0
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:

        async def slate(u: int) -> tuple[np.ndarray, str]:
            async with gate:
                r = await http.get("/api/recommendations/movies", headers={"uxid": f"sim-{tag}-{u}"})
                r.raise_for_status()
                return catalog.movie_index([m["id"] for m in r.json()][:10]), r.headers.get("x-recommendation-id", "")

        async def open_movie(u: int, movie: int, rid: str | None) -> None:
            headers = {"uxid": f"sim-{tag}-{u}"} | ({"X-Recommendation-Id": rid} if rid else {})
            async with gate:
                (await http.get(f"/api/movies/{int(catalog.movie_ids[movie])}", headers=headers)).raise_for_status()

        for _ in range(rounds):
            answers = await asyncio.gather(*(slate(u) for u in range(users)))
            slates = np.full((users, 10), -1, dtype=np.int64)
            for u, (movies, _) in enumerate(answers):
                slates[u, : len(movies)] = movies
                empty += int(len(movies) == 0)
            positions, opened = world.react(everyone, slates)
            await asyncio.gather(
                *(
                    open_movie(u, int(slates[u, positions[u]]), answers[u][1])
                    for u in range(users)
                    if positions[u] >= 0
                ),
                *(open_movie(u, int(opened[u]), None) for u in range(users) if opened[u] >= 0),
            )
            ctr.append(float((positions >= 0).mean()))
            await asyncio.sleep(0.2)  # the clicks' events reach the shards
    return {
        "users": users,
        "rounds": rounds,
        "ctr_by_round": [round(c, 3) for c in ctr],
        "ctr": float(np.mean(ctr)),
        "cold_start_ctr": float(np.mean(ctr[:5])),
        "empty_slates": empty,
    }
