"""Guarantees 1 and 2 under real faults: a steady stream of >= 10,000 feedback events while a
shard is SIGKILLed, the event router is killed, PostgreSQL and NATS restart, the supervisor is
SIGKILLed, and publishers send everything twice. After each: `mabrec verify` finds every
posterior equal to its recount from the event log, every API request during the fault was
answered 2xx (popularity fallback allowed for the dead shard), and the recovery time is printed.

These tests own their PostgreSQL and NATS (embedded servers on fixed ports), so restarting them
disturbs nothing else on the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from nats.errors import Error as NatsError
from nats.js import JetStreamContext

from bench.running import MABREC, RunningSystem, wait_until
from system.bus import stream
from system.core.catalog_file import SHIPPED, read_movies
from system.local import servers as embedded
from system.local.processes import free_port, stop_pid
from system.local.runtime import Service
from tests.conftest import RECOVERY, system

pytestmark = [pytest.mark.chaos, pytest.mark.integration]

EVENTS = 10_000
RATE = 1_500  # events per second: ~7 s of steady stream per scenario
USERS = 400
MOVIES = [m.id for m in read_movies(SHIPPED)][::400]  # 25 movies of the shipped catalog


@dataclass
class Servers:
    """PostgreSQL and NATS owned by this module: restartable on the same port and data."""

    state: Path
    pg_port: int = field(default_factory=free_port)
    nats_port: int = field(default_factory=free_port)
    pg: Service | None = None
    nats: Service | None = None

    def start_pg(self) -> None:
        self.pg = embedded.start_postgres(self.state, self.pg_port)

    def stop_pg(self) -> None:
        assert self.pg is not None
        stop_pid(self.pg.pid, signal.SIGINT)

    def start_nats(self) -> None:
        self.nats = embedded.start_nats(self.state, self.nats_port)

    def stop_nats(self) -> None:
        assert self.nats is not None
        stop_pid(self.nats.pid, signal.SIGTERM)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    s = Servers(tmp_path_factory.mktemp("chaos-servers"))
    s.start_pg()
    s.start_nats()
    yield s
    s.stop_nats()
    s.stop_pg()


@pytest.fixture(scope="module")
def running(servers: Servers, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningSystem]:
    assert servers.pg is not None and servers.nats is not None
    env = {
        "DATABASE_URL": servers.pg.url,
        "NATS_URL": servers.nats.url,
        "MABREC_NAMESPACE": "chaos",
        "MABREC_CHECKPOINT_INTERVAL": "0.5",
    }
    with system(tmp_path_factory.mktemp("chaos-system"), **env) as started:
        yield started


class Load:
    """A steady stream of events on NATS, and a steady trickle of API requests, in threads."""

    def __init__(self, running: RunningSystem, tag: str, twice: bool = False) -> None:
        assert running.runtime is not None
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
        wait_until(lambda: self.published >= EVENTS // 5, 30, "the load under way")

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
        for i in range(EVENTS):
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
                except httpx.HTTPError as exc:
                    self.statuses[0] += 1
                    self.failures.append(f"{uxid}: {exc!r}")
                i += 1
                time.sleep(0.02)


def status(running: RunningSystem) -> dict[str, Any]:
    assert running.runtime is not None
    answer: dict[str, Any] = httpx.get(f"{running.runtime.api_url}/api/status", timeout=10).json()
    return answer


def verify(running: RunningSystem) -> str:
    out = subprocess.run(
        [MABREC, "verify", "--timeout", "60"], env=running.env, capture_output=True, text=True, timeout=300
    )
    print(out.stdout)
    assert out.returncode == 0, out.stdout + out.stderr
    assert " 0 mismatches" in out.stdout and "OK" in out.stdout
    return out.stdout


def check_load(load: Load) -> None:
    print(f"api: {dict(load.statuses)} by source {dict(load.sources)}; events published {load.published}")
    assert load.published == EVENTS
    assert not load.failures, load.failures[:5]
    assert set(load.statuses) == {200}


def report(fault: str, seconds: float) -> None:
    RECOVERY.append(f"{fault}: {seconds:.2f} s")  # printed in the run's summary (tests/conftest.py)


def test_shard_killed_mid_stream(running: RunningSystem) -> None:
    with Load(running, "shardkill") as load:
        load.under_way()
        victim = status(running)["shards"][0]
        os.kill(victim["pid"], signal.SIGKILL)
        killed = time.monotonic()
        wait_until(
            lambda: status(running)["shards"][0]["pid"] != victim["pid"] and status(running)["shards"][0]["ready"],
            90,
            "a new shard 0 restored",
        )
        report("shard kill -9 -> restored and serving", time.monotonic() - killed)
        print(f"restore took {status(running)['shards'][0]['restore_seconds']:.2f} s inside the shard")
        load.wait()
    check_load(load)
    verify(running)


def test_hung_shard_is_found_by_timeouts_and_restarted(running: RunningSystem) -> None:
    """A shard that stops answering (SIGSTOP: alive, but frozen) is not a crash Ray can see: the
    supervisor's health checks time out, and after three in a row it has the shard killed."""
    with Load(running, "shardhang") as load:
        load.under_way()
        victim = status(running)["shards"][1]
        os.kill(victim["pid"], signal.SIGSTOP)
        frozen = time.monotonic()
        try:
            wait_until(
                lambda: status(running)["shards"][1]["pid"] != victim["pid"] and status(running)["shards"][1]["ready"],
                90,
                "a new shard 1 restored",
            )
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim["pid"], signal.SIGCONT)
        report("shard frozen (SIGSTOP) -> detected, replaced and restored", time.monotonic() - frozen)
        assert status(running)["shards"][1]["restarts"] >= 1
        load.wait()
    check_load(load)
    verify(running)


def test_router_killed_mid_stream(running: RunningSystem) -> None:
    with Load(running, "routerkill") as load:
        load.under_way()
        victim = status(running)["router"]
        os.kill(victim["pid"], signal.SIGKILL)
        killed = time.monotonic()

        def consuming_again() -> bool:
            router = status(running)["router"]
            return bool(
                router["pid"] != victim["pid"] and router["running"] and router["position"] > victim["position"]
            )

        wait_until(consuming_again, 90, "a new router routing")
        report("router kill -9 -> routing again", time.monotonic() - killed)
        load.wait()
    check_load(load)
    verify(running)


def test_postgres_restarted_mid_stream(running: RunningSystem, servers: Servers) -> None:
    with Load(running, "pgrestart") as load:
        load.under_way()
        servers.stop_pg()
        time.sleep(3)
        servers.start_pg()
        restarted, wall = time.monotonic(), time.time()
        wait_until(lambda: all(s["last_checkpoint"] > wall for s in status(running)["shards"]), 90, "checkpoints again")
        report("PostgreSQL restart -> every shard checkpointing again", time.monotonic() - restarted)
        load.wait()
    check_load(load)
    assert any(s["checkpoint_errors"] > 0 for s in status(running)["shards"]), "the outage went unnoticed?"
    verify(running)


def test_nats_restarted_mid_stream(running: RunningSystem, servers: Servers) -> None:
    with Load(running, "natsrestart") as load:
        load.under_way()
        servers.stop_nats()
        load.under_way()
        servers.start_nats()
        restarted = time.monotonic()
        position = status(running)["router"]["position"]
        wait_until(lambda: status(running)["router"]["position"] > position, 90, "events flowing again")
        report("NATS restart -> events flowing again", time.monotonic() - restarted)
        load.wait()
    check_load(load)
    # Impressions of the slates served during the outage waited in the API's buffer: published now.
    wait_until(lambda: status(running)["publisher"]["pending"] == 0, 30, "the API's buffer published")
    verify(running)


def test_supervisor_killed_and_started_again(running: RunningSystem) -> None:
    with Load(running, "supkill") as load:
        load.under_way()
        assert running.proc is not None
        running.proc.kill()  # SIGKILL: no cleanup at all
        running.proc.wait()
        killed = time.monotonic()
        time.sleep(1)
        running.proc = None
        running.start()  # the same command, the same directory: it adopts Ray and re-attaches
        report("supervisor kill -9 -> a new supervisor ready", time.monotonic() - killed)
        load.wait()
    check_load(load)  # the API actors kept answering while no supervisor ran
    verify(running)


def test_every_event_published_twice(running: RunningSystem) -> None:
    with Load(running, "twice", twice=True) as load:
        load.wait()
    check_load(load)
    verify(running)
    wait_until(
        lambda: sum(s["events_duplicate"] for s in status(running)["shards"]) >= EVENTS, 10, "every duplicate counted"
    )
    RECOVERY.append(
        f"every event published twice: {sum(s['events_duplicate'] for s in status(running)['shards'])} repeats skipped"
    )
