"""A steady load against a running system, in threads: feedback events published onto NATS
at a fixed rate (at least once, as a real publisher does), and slate requests (and clicks) over
HTTP, every answer recorded; with the checks the fault and scaling tests share."""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
from collections import Counter
from typing import Any

import httpx
import numpy as np
import orjson
from nats.errors import Error as NatsError
from nats.js import JetStreamContext

from bench.running import MABREC, RunningSystem, wait_until
from system.bus import stream
from system.core.catalog_file import SHIPPED, read_movies
from tests.conftest import RECOVERY

EVENTS = 6_000
RATE = 1_500  # events per second: ~4 s of steady stream
USERS = 400
MOVIES = [m.id for m in read_movies(SHIPPED)][::400]  # 25 movies of the shipped catalog


class Load:
    """A steady stream of events on NATS, and a steady trickle of API requests, in threads."""

    def __init__(
        self, running: RunningSystem, tag: str, twice: bool = False, events: int = EVENTS, clicks: bool = False
    ) -> None:
        assert running.runtime is not None
        self.events, self.clicks = events, clicks
        self.api = running.runtime.api_url
        self.nats_url = running.runtime.nats_url
        self.subject = f"{running.runtime.namespace}.events"
        self.tag, self.twice = tag, twice
        self.statuses: Counter[int] = Counter()
        self.sources: Counter[str] = Counter()
        self.failures: list[str] = []
        self.published = 0
        self.retries = 0
        self._done = threading.Event()
        self._threads = [threading.Thread(target=self._publish), threading.Thread(target=self._probe)]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def under_way(self) -> None:
        """Wait until a fifth of the events are out: the fault hits a stream in full flow."""
        wait_until(lambda: self.published >= self.events // 5, 30, "the load under way")

    def wait(self, timeout: float = 120.0) -> None:
        self._threads[0].join(timeout)
        assert not self._threads[0].is_alive(), "the event publisher did not finish"
        self._done.set()
        self._threads[1].join(10)

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        for t in self._threads:
            t.join(30)

    def _publish(self) -> None:
        asyncio.run(self._publish_async())

    async def _publish_async(self) -> None:
        rng = np.random.default_rng(abs(hash(self.tag)) % 2**32)
        nc = await stream.connect(self.nats_url, f"chaos-load-{self.tag}")
        js = nc.jetstream()
        began = time.monotonic()
        for i in range(self.events):
            event = {
                "event_type": "clicked" if rng.random() < 0.15 else "seen",
                "entity_type": "movies",
                "entity_id": int(rng.choice(MOVIES)),
                "user_id": f"{self.tag}-user-{int(rng.integers(USERS))}",
                "event_id": f"{self.tag}-{i}",
            }
            payload = orjson.dumps(event)
            for _ in range(2 if self.twice else 1):
                await self._publish_one(js, payload)
            self.published += 1
            # Steady rate: sleep off any lead over the schedule.
            lead = began + (i + 1) / RATE - time.monotonic()
            if lead > 0:
                await asyncio.sleep(lead)
        await nc.close()

    async def _publish_one(self, js: JetStreamContext, payload: bytes) -> None:
        """At-least-once, as a real publisher would: retry until JetStream confirms."""
        while True:
            try:
                await js.publish(self.subject, payload, timeout=2.0)
                return
            except (NatsError, TimeoutError):  # NATS restarting: retry the same event
                self.retries += 1
                await asyncio.sleep(0.1)

    def _probe(self) -> None:
        with httpx.Client(base_url=self.api, timeout=10.0) as client:
            i = 0
            while not self._done.is_set():
                uxid = f"{self.tag}-user-{i % USERS}"
                try:
                    r = client.get("/api/recommendations/movies", headers={"uxid": uxid})
                    self.statuses[r.status_code] += 1
                    self.sources[r.headers.get("x-mabrec-source", "?")] += 1
                    if r.status_code != 200 or len(r.json()) != 10:
                        self.failures.append(f"{uxid}: {r.status_code} {r.text[:200]}")
                    elif self.clicks and i % 5 == 0:  # now and then, the user opens the first movie
                        opened = client.get(f"/api/movies/{r.json()[0]['id']}", headers={"uxid": uxid})
                        self.statuses[opened.status_code] += 1
                except httpx.HTTPError as exc:
                    self.statuses[0] += 1
                    self.failures.append(f"{uxid}: {exc!r}")
                i += 1
                time.sleep(0.02)


def status(running: RunningSystem) -> dict[str, Any]:
    assert running.runtime is not None
    answer: dict[str, Any] = httpx.get(
        f"{running.runtime.api_url}/api/status", headers=running.admin_headers, timeout=10
    ).json()
    return answer


def verify(running: RunningSystem) -> str:
    out = subprocess.run(
        [MABREC, "verify", "--timeout", "60"], env=running.env, capture_output=True, text=True, timeout=300
    )
    print(out.stdout)
    assert out.returncode == 0, out.stdout + out.stderr
    assert " 0 mismatches" in out.stdout and "OK" in out.stdout
    return out.stdout


def check_load(load: Load, fallback_ok: bool = True) -> None:
    """Every event published; every request answered 200 with a full slate; with `fallback_ok`
    off, every slate personal too (a popularity slate is a failure when no shard was down)."""
    print(f"api: {dict(load.statuses)} by source {dict(load.sources)}; events published {load.published}")
    assert load.published == load.events
    assert not load.failures, load.failures[:5]
    assert set(load.statuses) == {200}
    if not fallback_ok:
        assert set(load.sources) == {"personal"}, dict(load.sources)


def report(fault: str, seconds: float) -> None:
    RECOVERY.append(f"{fault}: {seconds:.2f} s")  # printed in the run's summary (tests/conftest.py)
