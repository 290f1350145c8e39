"""Scaling live, as ops do it, on the real system (`mabrec up` with Ray, two API actors):
4 -> 8 shards with `mabrec scale`, 8 -> 3 through the admin API, then a rolling restart, each
under a steady load of slates, clicks and NATS events. Every request must get a personal slate
(no popularity fallback: no shard is down), and verify must find zero mismatches after each."""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from bench.growth import flood
from bench.running import MABREC, RunningSystem, wait_until
from system.core.catalog_file import SHIPPED, read_movies
from tests.conftest import RECOVERY, drop_database, make_database, system
from tests.load import Load, check_load, status, verify

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

USERS = 100_000  # moved with their slots, every step
TOKEN = secrets.token_hex(16)


@pytest.fixture(scope="module")
def running(services: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningSystem]:
    database = make_database(services["database"])
    env = {
        "DATABASE_URL": database,
        "NATS_URL": services["nats"],
        "MABREC_NAMESPACE": f"sc{secrets.token_hex(4)}",
        "MABREC_SHARDS": "4",
        "MABREC_API_WORKERS": "2",
        "MABREC_ADMIN_TOKEN": TOKEN,
    }
    with system(tmp_path_factory.mktemp("scaling"), **env) as started:
        assert started.runtime is not None
        runtime = started.runtime
        movies = [m.id for m in read_movies(SHIPPED)]
        asyncio.run(
            flood(runtime.api_url, runtime.nats_url, f"{runtime.namespace}.events", users=USERS, movie_ids=movies)
        )
        yield started
    drop_database(services["database"], database)


def slots_per_shard(running: RunningSystem) -> list[int]:
    counts: list[int] = np.bincount(status(running)["slot_owners"]).tolist()
    return counts


def test_4_to_8_shards_with_mabrec_scale_under_load(running: RunningSystem) -> None:
    with Load(running, "up", clicks=True) as load:
        load.under_way()
        began = time.monotonic()
        out = subprocess.run(
            [MABREC, "scale", "--shards", "8"], env=running.env, capture_output=True, text=True, timeout=300
        )
        seconds = time.monotonic() - began
        assert out.returncode == 0, out.stdout + out.stderr
        load.wait()
    check_load(load, fallback_ok=False)
    assert len(slots_per_shard(running)) == 8 and max(slots_per_shard(running)) - min(slots_per_shard(running)) <= 1
    moved = [line for line in out.stderr.splitlines() if "slots moved" in line]  # it showed progress
    done, total = moved[-1].split(": ")[1].split(" ")[0].split("/") if moved else ("0", "?")
    assert done == total, out.stderr  # and its end: N/N
    RECOVERY.append(f"re-shard 4 -> 8 with {USERS:,} users, under load: {seconds:.2f} s (mabrec scale)")
    assert seconds < 30
    verify(running)


def test_8_to_3_shards_through_the_admin_api_under_load(running: RunningSystem) -> None:
    assert running.http is not None
    with Load(running, "down", clicks=True) as load:
        load.under_way()
        began = time.monotonic()
        refused = running.http.post("/api/admin/scale", json={"shards": 3}, headers={"Authorization": "Bearer x"})
        assert refused.status_code == 401  # not the token, no change
        asked = running.http.post("/api/admin/scale", json={"shards": 3}, headers={"Authorization": f"Bearer {TOKEN}"})
        assert asked.status_code == 202
        wait_until(
            lambda: len(status(running)["shards"]) == 3 and not status(running)["change"], 60, "3 shards", poll=0.1
        )
        seconds = time.monotonic() - began
        load.wait()
    check_load(load, fallback_ok=False)
    assert slots_per_shard(running) in ([342, 341, 341], [341, 342, 341], [341, 341, 342])
    RECOVERY.append(f"re-shard 8 -> 3 with {USERS:,} users, under load: {seconds:.2f} s (admin API)")
    assert seconds < 30
    verify(running)


def test_both_api_actors_serve_the_same_users_the_same_way(running: RunningSystem) -> None:
    """Each new connection lands on either API actor (SO_REUSEPORT): every answer about a user
    is the same, whichever served it, and both served."""
    assert running.runtime is not None
    before = {a["api"]: a["publisher"]["published"] for a in status(running)["apis"]}
    users = [f"up-user-{i}" for i in range(0, 400, 40)]
    for uxid in users:
        profiles = []
        for _ in range(8):
            # a new connection each time
            with httpx.Client(base_url=running.runtime.api_url, timeout=10, headers=running.admin_headers) as fresh:
                profiles.append(fresh.get("/api/profile", headers={"uxid": uxid}).json())
        assert all(p == profiles[0] for p in profiles), uxid
    for uxid in users * 3:  # slates (each publishes an impression) through either actor
        with httpx.Client(base_url=running.runtime.api_url, timeout=10) as fresh:
            assert (
                fresh.get("/api/recommendations/movies", headers={"uxid": uxid}).headers["x-mabrec-source"]
                == "personal"
            )

    def both_published() -> bool:  # acknowledged by NATS, as the supervisor's last health check saw
        after = {a["api"]: a["publisher"]["published"] for a in status(running)["apis"]}
        return sorted(after) == [0, 1] and all(after[a] > before.get(a, 0) for a in after)

    wait_until(both_published, 30, "impressions published by both API actors")


def test_a_rolling_restart_under_load_fails_nothing(running: RunningSystem) -> None:
    pids = {s["shard"]: s["pid"] for s in status(running)["shards"]}
    with Load(running, "roll", clicks=True, events=30_000) as load:
        load.under_way()
        began = time.monotonic()
        out = subprocess.run(
            [MABREC, "restart", "--rolling"], env=running.env, capture_output=True, text=True, timeout=600
        )
        seconds = time.monotonic() - began
        assert out.returncode == 0, out.stdout + out.stderr
        load.wait(timeout=180)
    check_load(load, fallback_ok=False)
    assert all(s["pid"] != pids[s["shard"]] for s in status(running)["shards"])  # every one replaced
    RECOVERY.append(f"rolling restart of 3 shards under load: {seconds:.2f} s, no request failed")
    verify(running)
