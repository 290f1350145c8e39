"""mabrec's own figures in Ray's metrics export, end to end: `mabrec up` starts its local Ray with
a metrics export port on 127.0.0.1 and records its URL; traffic through the API moves the shards'
and the router's metrics there (actors/ray_metrics.py), as Prometheus would scrape them. Ray's
agent exports every few seconds: each check polls, with a generous timeout."""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.running import MABREC, RunningSystem, wait_until
from tests.conftest import own_system

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

EXPORT_TIMEOUT = 90.0  # Ray's agent exports every few seconds; a busy 2-core machine takes longer


@pytest.fixture(scope="module")
def running(services: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningSystem]:
    with own_system(services, tmp_path_factory, "ray-metrics") as started:
        yield started


def scrape(url: str) -> list[tuple[str, dict[str, str], float]]:
    """Every sample of a Prometheus text export: (name, labels, value)."""
    text = httpx.get(url, timeout=10).text
    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples]


def total(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    """The sum of a sample name's values (over Ray's per-worker series), with these labels."""
    return sum(v for n, tags, v in samples if n == name and all(tags.get(k) == w for k, w in labels.items()))


def present(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> bool:
    return any(n == name and all(tags.get(k) == w for k, w in labels.items()) for n, tags, _ in samples)


def metrics_url(running: RunningSystem) -> str:
    assert running.runtime is not None and running.runtime.metrics_url, "no metrics URL in the runtime file"
    return running.runtime.metrics_url


def test_the_metrics_export_is_recorded_printed_and_bound_to_loopback_only(running: RunningSystem) -> None:
    url = metrics_url(running)
    parts = urlsplit(url)
    assert parts.scheme == "http" and parts.hostname == "127.0.0.1" and parts.port
    assert f"Ray metrics {url}" in running.tail(20_000)  # what `mabrec up` printed
    listening = [c.laddr for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == parts.port]
    assert listening and all(addr.ip == "127.0.0.1" for addr in listening), listening
    assert "ray_" in httpx.get(url, timeout=10).text  # Ray's own figures are there already


def test_traffic_moves_the_shard_and_router_metrics(running: RunningSystem) -> None:
    url = metrics_url(running)
    tag = secrets.token_hex(3)
    users = [f"rm-{tag}-{i}" for i in range(8)]  # over both shards, almost surely
    shards = [str(s["shard"]) for s in running.get("/api/status").json()["shards"]]
    assert shards == ["0", "1"]

    def read(samples: list[tuple[str, dict[str, str], float]]) -> dict[str, float]:
        return {
            "applied": total(samples, "ray_mabrec_shard_applied_events_total"),
            "slate_calls": total(samples, "ray_mabrec_shard_slate_seconds_count"),
            "routed": total(samples, "ray_mabrec_router_routed_events_total"),
        }

    before = read(scrape(url))
    for user in users:
        response = running.get("/api/recommendations/movies", user)
        assert response.status_code == 200 and response.headers["x-mabrec-source"] == "personal"
    assert running.get("/api/movies/42", users[0]).status_code == 200  # a click
    assert running.http is not None
    posted = running.http.post(
        "/api/events", json=[{"event_type": "clicked", "entity_id": 7, "user_id": user} for user in users]
    )
    assert posted.status_code == 202, posted.text

    def moved() -> bool:
        samples = scrape(url)
        now = read(samples)
        return (
            now["applied"] > before["applied"]
            and now["slate_calls"] >= before["slate_calls"] + 1
            and now["routed"] >= before["routed"] + len(users) + 1
            and total(samples, "ray_mabrec_shard_resident_users") > 0
            and all(present(samples, "ray_mabrec_shard_checkpoint_lag_events", shard=s) for s in shards)
            and all(present(samples, "ray_mabrec_shard_checkpoint_lag_seconds", shard=s) for s in shards)
        )

    wait_until(moved, EXPORT_TIMEOUT, "the shard and router metrics in Ray's export", poll=1.0)
    samples = scrape(url)
    # Each series is tagged with its shard; the slate latencies are real seconds.
    assert {tags.get("shard") for n, tags, _ in samples if n == "ray_mabrec_shard_resident_users"} <= set(shards)
    seconds, calls = (
        total(samples, "ray_mabrec_shard_slate_seconds_sum"),
        total(samples, "ray_mabrec_shard_slate_seconds_count"),
    )
    assert 0 < seconds < 60 * calls  # (Ray sums a histogram from its buckets: near, not exact)
    # Once the shards have checkpointed what they applied, nothing is late.
    wait_until(
        lambda: total(scrape(url), "ray_mabrec_shard_checkpoint_lag_seconds") < 5,
        EXPORT_TIMEOUT,
        "the checkpoint lag back near zero",
        poll=1.0,
    )


def test_the_status_command_shows_the_metrics_url(running: RunningSystem) -> None:
    out = subprocess.run([MABREC, "status"], env=running.env, capture_output=True, text=True, timeout=60)
    assert f"metrics    {metrics_url(running)}" in out.stdout, out.stdout + out.stderr
