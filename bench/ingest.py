"""`mabrec bench ingest`: feedback events into JetStream at a fixed rate, as another service
would publish them, and how fast and how soon they reach shard state.

Each event carries `ts` (its publish time); shards count publish-to-applied lag in a histogram
(`mabrec_event_apply_lag_seconds`), read here before and after. The sustained rate is the events
applied (shards' counters) over the time from the first publish to the last application.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import orjson

from bench.loadtest import percentiles_from_buckets
from system.bus import stream
from system.core.events import LAG_EDGES
from system.local import admin_token


def _applied(status: dict[str, Any]) -> tuple[int, np.ndarray, float]:
    """(events applied by all shards, their lag histogram, when the counters were read)."""
    shards = status.get("shards", [])
    lag = np.zeros(len(LAG_EDGES) + 1, dtype=np.int64)
    for s in shards:
        if s.get("lag_buckets"):
            lag += np.asarray(s["lag_buckets"], dtype=np.int64)
    applied = sum(s.get("events_applied", 0) + s.get("events_duplicate", 0) for s in shards)
    return applied, lag, min((s.get("checked") or 0.0 for s in shards), default=0.0)


async def run(
    api_url: str,
    nats_url: str,
    subject: str,
    *,
    rate: float = 20_000,
    duration: float = 10.0,
    per_message: int = 100,
    users: int = 100_000,
    prefix: str = "ingest-",
    movie_ids: list[int],
    seed: int = 0,
    progress: Callable[[float], None] | None = None,
) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    async with httpx.AsyncClient(base_url=api_url, headers=admin_token.headers(api_url), timeout=10) as http:

        async def status() -> dict[str, Any]:
            answer: dict[str, Any] = (await http.get("/api/status")).json()
            return answer

        applied_before, lag_before, _ = _applied(await status())
        samples: list[tuple[float, int]] = []  # (when the shard counters were read, applied)
        nc = await stream.connect(nats_url, "bench-ingest")
        js = nc.jetstream()
        total = int(rate * duration)
        tick = 0.01
        per_tick = max(1, int(rate * tick))
        sent = 0
        began = time.perf_counter()
        pending: list[Any] = []
        ids = np.asarray(movie_ids)
        while sent < total:
            due = began + sent / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            now = time.time()
            batch = []
            for i in range(min(per_tick, total - sent)):
                user = f"{prefix}{(int(rng.zipf(1.1)) - 1) % users}"
                if rng.random() < 0.8:  # an impression of a slate of 10
                    event = {
                        "event_type": "seen",
                        "entity_ids": ids[rng.choice(len(ids), size=10, replace=False)].tolist(),  # distinct
                        "user_id": user,
                    }
                else:
                    event = {"event_type": "clicked", "entity_id": int(ids[rng.integers(len(ids))]), "user_id": user}
                event["event_id"] = f"ingest-{seed}-{sent + i}"
                event["ts"] = now
                batch.append(orjson.dumps(event))
            for start in range(0, len(batch), per_message):
                chunk = batch[start : start + per_message]
                pending.append(await js.publish_async(subject, b"[" + b",".join(chunk) + b"]"))
            sent += len(batch)
            if sent % (per_tick * 50) < per_tick:  # twice a second: the shards' counters (they refresh every second)
                applied, _, checked = _applied(await status())
                if not samples or checked > samples[-1][0]:
                    samples.append((checked, applied))
            if len(pending) > 200:
                await asyncio.gather(*pending)
                pending.clear()
            if progress:
                progress(0.7 * sent / total)
        await asyncio.gather(*pending)
        published_in = time.perf_counter() - began
        await nc.close()

        # Wait for the shards to have applied everything (their counters refresh every second).
        deadline = time.perf_counter() + 120
        while True:
            applied, lag, _ = _applied(await status())
            if applied - applied_before >= total or time.perf_counter() > deadline:
                break
            await asyncio.sleep(0.1)
        applied_in = time.perf_counter() - began
    lag_delta = (lag - lag_before).tolist()
    edges = [*LAG_EDGES.tolist(), float("inf")]
    lag_ms = {k: round(v * 1e3, 1) for k, v in percentiles_from_buckets(edges, lag_delta, (50, 90, 99)).items()}
    # Sustained: the slope of applied events over the steady part of the run (its first fifth
    # is warm-up); the counters are read from the shards about once a second.
    steady = samples[len(samples) // 5 :]
    sustained = (
        float(np.polyfit([t for t, _ in steady], [a for _, a in steady], 1)[0]) if len(steady) >= 3 else float("nan")
    )
    return {
        "events": total,
        "events_per_message": per_message,
        "target_rate": rate,
        "published_rate": round(total / published_in, 1),
        "applied": applied - applied_before,
        "applied_rate": round(sustained, 1),
        "all_applied_within_s": round(applied_in, 2),
        "publish_to_applied_ms": lag_ms,
    }
