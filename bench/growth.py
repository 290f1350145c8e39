"""State at scale, against a running system (`mabrec bench growth`, and the report):

- `flood`: many distinct users, each touched once (an impression of a slate), straight onto
  NATS at a steady rate; returns when every shard has applied and checkpointed them;
- `memory`: the shards' resident memory (their processes' RSS, as the OS counts it) and what
  each user costs in PostgreSQL (the user_state table's size over its rows);
- `slate_latency`: slates for users in memory and for users evicted (loaded from PostgreSQL
  on the way), timed one at a time by a few clients.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import psutil
import psycopg

from bench.loadtest import Connection, Histogram
from bench.running import RunningSystem
from system.bus import stream
from system.local import admin_token


async def flood(
    api_url: str,
    nats_url: str,
    subject: str,
    *,
    users: int,
    first_user: int = 0,
    rate: float = 40_000,
    per_message: int = 500,
    movie_ids: list[int],
    progress: Callable[[float], None] | None = None,
) -> dict[str, Any]:
    """One impression each for users `first_user` .. `first_user + users - 1` (ids `grow-N`),
    published at `rate` events/s; waits until every shard applied and checkpointed them."""
    rng = np.random.default_rng(first_user)
    ids = np.asarray(movie_ids)
    nc = await stream.connect(nats_url, "bench-growth")
    js = nc.jetstream()
    began = time.perf_counter()
    pending: list[Any] = []
    last = 0
    for start in range(first_user, first_user + users, per_message):
        end = min(start + per_message, first_user + users)
        # Ten distinct movies each (a slate never names one twice): from a random place, in a row.
        slates = ids[(rng.integers(len(ids), size=(end - start, 1)) + np.arange(10)) % len(ids)].tolist()
        batch = [
            b'{"event_type":"seen","user_id":"grow-%d","event_id":"grow-%d","entity_ids":%s}' % (u, u, orjson.dumps(s))
            for u, s in zip(range(start, end), slates, strict=True)
        ]
        pending.append(await js.publish_async(subject, b"[" + b",".join(batch) + b"]"))
        if len(pending) >= 100:
            last = max([last, *(int(a.seq) for a in await asyncio.gather(*pending))])
            pending.clear()
        lead = began + (end - first_user) / rate - time.perf_counter()
        if lead > 0:
            await asyncio.sleep(lead)
        if progress:
            progress(0.5 * (end - first_user) / users)
    last = max([last, *(int(a.seq) for a in await asyncio.gather(*pending))])
    published_in = time.perf_counter() - began
    await nc.close()
    await wait_applied(api_url, last, checkpointed=True)
    applied_in = time.perf_counter() - began
    return {
        "users": users,
        "published_per_s": round(users / published_in),
        "applied_per_s": round(users / applied_in),
        "last_seq": last,
    }


async def wait_applied(api_url: str, seq: int, *, checkpointed: bool = False) -> None:
    """Until every shard has applied the stream up to `seq` (and checkpointed it, if asked)."""
    async with httpx.AsyncClient(base_url=api_url, headers=admin_token.headers(api_url), timeout=30) as http:
        while True:
            shards = (await http.get("/api/status")).json()["shards"]
            if all(s["covered_seq"] >= seq and (not checkpointed or s["checkpoint_seq"] >= seq) for s in shards):
                return
            await asyncio.sleep(0.2)


async def memory(api_url: str, database_url: str) -> dict[str, Any]:
    """The shards' memory and the users' cost in PostgreSQL, now."""
    async with httpx.AsyncClient(base_url=api_url, headers=admin_token.headers(api_url), timeout=30) as http:
        shards = (await http.get("/api/status")).json()["shards"]
    rss = [psutil.Process(s["pid"]).memory_info().rss for s in shards]
    with psycopg.connect(database_url) as conn:
        users, size = conn.execute(
            "SELECT count(*), pg_total_relation_size('user_state') FROM user_state"
        ).fetchone() or (0, 0)
    return {
        "shards": len(shards),
        "resident_users": sum(s["users"] for s in shards),
        "evicted": sum(s["users_evicted"] for s in shards),
        "users_loaded": sum(s["users_loaded"] for s in shards),
        "shard_rss_gib": round(sum(rss) / 2**30, 3),
        "shard_rss_mib_each": [round(r / 2**20) for r in rss],
        "users_in_postgres": users,
        "postgres_bytes_per_user": round(size / users) if users else 0,
        "postgres_gib": round(size / 2**30, 3),
    }


async def slate_latency(api_url: str, uxids: list[str], clients: int = 4) -> dict[str, Any]:
    """Each user's slate once, `clients` at a time: latency percentiles and errors."""
    host, port = api_url.removeprefix("http://").rsplit(":", 1)
    histogram, errors = Histogram(), 0
    queue = list(reversed(uxids))

    async def client() -> None:
        nonlocal errors
        connection = Connection(host, int(port))
        try:
            while queue:
                uxid = queue.pop()
                began = time.perf_counter()
                status, _, _ = await connection.get("/api/recommendations/movies", {"uxid": uxid})
                histogram.add(time.perf_counter() - began)
                errors += status != 200
        finally:
            await connection.close()

    await asyncio.gather(*(client() for _ in range(clients)))
    return {
        "slates": len(uxids),
        "errors": errors,
        **{f"p{q:g}_ms": round(histogram.percentile(q) * 1e3, 2) for q in (50, 90, 99)},
    }


def restart_after_log(events: int, shards: int, movie_ids: list[int], step: Callable[[str], None]) -> dict[str, Any]:
    """A system started on an empty log; `events` ingested (impressions of users among a
    million); stopped; started again on the same data: both times to ready, how far the router
    and the shards had to read, and how soon a fresh click shows in the user's state."""
    state = Path(tempfile.mkdtemp(prefix="mabrec-bench-"))
    env = {"MABREC_SHARDS": str(shards), "MABREC_DASHBOARD": "0"}
    try:
        with RunningSystem(state, env).start(timeout=120) as first:
            assert first.runtime is not None
            empty = first.started_in
            step(f"restart: ingesting {events:,} events")
            rng = np.random.default_rng(7)
            users = rng.integers(0, 1_000_000, events)
            ingested = asyncio.run(
                flood_events(
                    first.runtime.api_url, first.runtime.nats_url, f"{first.runtime.namespace}.events", users, movie_ids
                )
            )
        step("restart: starting again")
        with RunningSystem(state, env).start(timeout=120) as second:
            uxid = f"fresh-{events}"
            clicked = time.perf_counter()
            second.get(f"/api/movies/{movie_ids[0]}", uxid)
            while second.get("/api/profile", uxid).json()["clicks"] < 1:
                time.sleep(0.002)
            click = time.perf_counter() - clicked
            status = second.get("/api/status").json()
        return {
            "events": events,
            **ingested,
            "ready_s_empty_log": round(empty, 2),
            "ready_s_after": round(second.started_in, 2),
            "click_visible_ms": round(click * 1e3, 1),
            "routed_after_restart": status["router"]["events"],
            "replayed_after_restart": sum(s["replayed"] for s in status["shards"]),
        }
    finally:
        shutil.rmtree(state, ignore_errors=True)  # embedded servers' data: gigabytes here


async def flood_events(
    api_url: str, nats_url: str, subject: str, users: np.ndarray, movie_ids: list[int], per_message: int = 1000
) -> dict[str, Any]:
    """One impression per entry of `users` (user ids `log-N`), as fast as they are stored;
    waits until every shard applied and checkpointed them."""
    rng = np.random.default_rng(11)
    ids = np.asarray(movie_ids)
    nc = await stream.connect(nats_url, "bench-restart")
    js = nc.jetstream()
    began = time.perf_counter()
    pending: list[Any] = []
    last = 0
    for start in range(0, len(users), per_message):
        chunk = users[start : start + per_message]
        movies = ids[rng.integers(len(ids), size=len(chunk))].tolist()
        batch = [
            b'{"event_type":"seen","user_id":"log-%d","event_id":"log-%d","entity_id":%d}' % (u, start + i, m)
            for i, (u, m) in enumerate(zip(chunk.tolist(), movies, strict=True))
        ]
        pending.append(await js.publish_async(subject, b"[" + b",".join(batch) + b"]"))
        if len(pending) >= 200:
            last = max([last, *(int(a.seq) for a in await asyncio.gather(*pending))])
            pending.clear()
    last = max([last, *(int(a.seq) for a in await asyncio.gather(*pending))])
    await nc.close()
    async with httpx.AsyncClient(base_url=api_url, headers=admin_token.headers(api_url), timeout=30) as http:
        while True:
            shards = (await http.get("/api/status")).json()["shards"]
            if all(s["covered_seq"] >= last and s["checkpoint_seq"] >= last for s in shards):
                break
            await asyncio.sleep(1.0)
    return {"ingest_events_per_s": round(len(users) / (time.perf_counter() - began)), "stream_messages": last}
