"""Guarantees 1 and 2 under real faults: a steady stream of >= 10,000 feedback events while a
shard is SIGKILLed, the event router is killed, PostgreSQL and NATS restart, the supervisor is
SIGKILLed, and publishers send everything twice. After each: `mabrec verify` finds every
posterior equal to its recount from the event log, every API request during the fault was
answered 2xx (popularity fallback allowed for the dead shard), and the recovery time is printed.

These tests own their PostgreSQL and NATS (embedded servers on fixed ports), so restarting them
disturbs nothing else on the machine.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from bench.running import RunningSystem, wait_until
from system.core.settings import Settings
from system.local import servers as embedded
from system.local.processes import free_port, stop_pid
from system.local.runtime import Service
from tests.conftest import RECOVERY, system
from tests.load import EVENTS, Load, check_load, report, status, verify

pytestmark = [pytest.mark.chaos, pytest.mark.e2e, pytest.mark.integration]  # e2e: it runs `mabrec up`


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
        self.nats = embedded.start_nats(self.state, Settings(), self.nats_port)

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
        errors = sum(s["checkpoint_errors"] for s in status(running)["shards"])
        servers.stop_pg()
        # A click while it is down, so some shard has state to write whether or not the load's
        # own events are all applied by now; PostgreSQL stays down until a checkpoint failed.
        assert running.runtime is not None
        httpx.post(
            f"{running.runtime.api_url}/api/events",
            json={"event_type": "clicked", "entity_id": 1, "user_id": "pg-outage"},
            timeout=10,
        ).raise_for_status()
        wait_until(
            lambda: sum(s["checkpoint_errors"] for s in status(running)["shards"]) > errors,
            60,
            "a checkpoint failing while PostgreSQL is down",
        )
        servers.start_pg()
        restarted, wall = time.monotonic(), time.time()
        wait_until(lambda: all(s["last_checkpoint"] > wall for s in status(running)["shards"]), 90, "checkpoints again")
        report("PostgreSQL restart -> every shard checkpointing again", time.monotonic() - restarted)
        load.wait()
    check_load(load)
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
