"""The metrics pipeline as files and pure logic (no services): the Grafana dashboard and the
Prometheus rules use only metrics that exist (mabrec's Ray metrics, actors/ray_metrics.py, as Ray
exports them, and the API's /metrics, api/metrics.py); the compose file runs Prometheus and
Grafana on those files, loopback-only, scraping what the Ray nodes and the API export; and the
exporters turn an actor's status into gauges and counter increments, across restarts.
(tests/test_e2e.py reads the real export of a running system.)"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from actors import ray_metrics
from actors.api_host import fallback_slates
from actors.ray_metrics import (
    CHECKPOINT_LAG_EVENTS,
    CHECKPOINT_LAG_SECONDS,
    EVENTS_APPLIED,
    RESIDENT_USERS,
    SPECS,
    Deltas,
    Exporter,
    ShardMetrics,
    Spec,
    api_readings,
    router_readings,
    shard_readings,
)
from api.metrics import ApiMetrics, StatusCollector

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
DASHBOARD = json.loads((DEPLOY / "grafana" / "dashboards" / "mabrec.json").read_text())
PROMETHEUS = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
ALERTS = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())

# PromQL's own words (functions, aggregations, keywords) and Prometheus's own series.
PROMQL = {
    "sum", "max", "min", "avg", "count", "rate", "irate", "increase", "histogram_quantile", "clamp_min",
    "clamp_max", "topk", "bottomk", "abs", "vector", "scalar", "time", "offset", "and", "or", "unless", "bool",
}  # fmt: skip
PROMETHEUS_OWN = {"up"}


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression reads: what is left of it without strings, label
    matchers, ranges, grouping label lists, numbers and PromQL's own words."""
    expr = re.sub(r'"[^"]*"', "", expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\b\d+(\.\d+)?(e-?\d+)?\b", "", expr)
    return set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr)) - PROMQL


def ray_names() -> set[str]:
    return {name for spec in SPECS for name in spec.exported}


def api_names() -> set[str]:
    """What the API's /metrics exports: its own metrics and the status collector's, by family
    type (a labelled family with no child yet has no sample, but its name is known)."""
    metrics = ApiMetrics()
    metrics.registry.register(StatusCollector(lambda: {"shards": [{"shard": 0}], "router": {}}))
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
    return {family.name + s for family in metrics.registry.collect() for s in suffixes[family.type]}


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in DASHBOARD["panels"] for t in p.get("targets", [])]


def alert_exprs() -> list[str]:
    return [str(rule["expr"]) for group in ALERTS["groups"] for rule in group["rules"]]


def test_the_names_the_checks_know_are_the_real_ones() -> None:
    assert "ray_mabrec_shard_slate_seconds_bucket" in ray_names()
    assert "ray_mabrec_router_routed_events_total" in ray_names()
    assert {"mabrec_http_requests_total", "mabrec_http_request_seconds_bucket", "mabrec_recommendations_total"} <= (
        api_names()
    )
    assert {"mabrec_shard_users", "mabrec_event_apply_lag_seconds_bucket", "mabrec_publish_buffer"} <= api_names()
    assert metric_names('histogram_quantile(0.99, sum by (le, x) (rate(a_b_bucket{c="d"}[$__rate_interval])))') == {
        "a_b_bucket"
    }


def test_every_metric_the_dashboard_and_the_alerts_use_exists() -> None:
    known = ray_names() | api_names() | PROMETHEUS_OWN
    for expr in dashboard_exprs() + alert_exprs():
        names = metric_names(expr)
        assert names, expr
        assert names <= known, f"{expr!r} uses {sorted(names - known)}, which nothing exports"


def test_the_dashboard_shows_every_mabrec_ray_metric_and_the_api_metrics() -> None:
    used = set().union(*(metric_names(e) for e in dashboard_exprs()))
    for spec in SPECS:
        assert used & set(spec.exported), f"{spec.name} is on no panel"
    assert {"mabrec_http_requests_total", "mabrec_recommendations_total"} <= used
    exprs = " ".join(dashboard_exprs())
    for quantile in ("0.5", "0.99"):
        assert f"histogram_quantile({quantile}, sum by (le) (rate(ray_mabrec_shard_slate_seconds_bucket" in exprs
    assert "rate(ray_mabrec_shard_applied_events_total" in exprs


def test_the_dashboard_is_a_grafana_dashboard_over_the_provisioned_datasource() -> None:
    datasource = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = datasource["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    assert source["name"] == "Prometheus"  # what Ray's own dashboards ask for (RAY_PROMETHEUS_NAME)
    assert DASHBOARD["uid"] == "mabrec" and DASHBOARD["panels"]
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))
    for panel in DASHBOARD["panels"]:
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]) and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == source["uid"], panel["title"]
            assert all(t["datasource"]["uid"] == source["uid"] and t["refId"] for t in panel["targets"])


def volumes(service: str) -> dict[str, str]:
    """Container path -> host path (or volume name) of a compose service's mounts."""
    mounts = {}
    for mount in COMPOSE["services"][service].get("volumes", []):
        host, container, *_ = mount.split(":")
        mounts[container] = host
    return mounts


def test_compose_runs_prometheus_and_grafana_on_these_files_on_loopback_only() -> None:
    services = COMPOSE["services"]
    assert services["prometheus"]["image"].startswith("prom/prometheus")
    assert services["grafana"]["image"].startswith("grafana/grafana")
    for name in ("prometheus", "grafana", "mabrec"):
        assert services[name]["ports"] and all(p.startswith("127.0.0.1:") for p in services[name]["ports"]), name
    prometheus = volumes("prometheus")
    assert prometheus["/etc/prometheus/prometheus.yml"] == "./deploy/prometheus/prometheus.yml"
    assert prometheus["/etc/prometheus/alerts.yml"] == "./deploy/prometheus/alerts.yml"
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]
    assert PROMETHEUS["rule_files"] == ["/etc/prometheus/alerts.yml"]
    grafana = volumes("grafana")
    assert grafana["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"
    providers = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "dashboards.yml").read_text())
    paths = {p["name"]: p["options"]["path"] for p in providers["providers"]}
    assert grafana[paths["mabrec"]] == "./deploy/grafana/dashboards"
    # Ray's own dashboards: the head writes them into a volume Grafana reads.
    head_env = {k: str(v) for k, v in services["mabrec"]["environment"].items()}
    assert volumes("mabrec")[head_env["RAY_METRICS_GRAFANA_DASHBOARD_OUTPUT_DIR"]] == grafana[paths["ray"]]
    for host in {*prometheus.values(), *grafana.values()}:
        assert not host.startswith(".") or (ROOT / host).exists(), host
    env = services["grafana"]["environment"]
    assert env["GF_SECURITY_ALLOW_EMBEDDING"] == "true" and env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"


def test_the_ray_head_uses_them_and_prometheus_scrapes_every_ray_node_and_the_api() -> None:
    services = COMPOSE["services"]
    env = {k: str(v) for k, v in services["mabrec"]["environment"].items()}
    assert env["RAY_PROMETHEUS_HOST"] == "http://prometheus:9090"
    assert env["RAY_GRAFANA_HOST"] == "http://grafana:3000"
    assert env["RAY_GRAFANA_IFRAME_HOST"] == "http://" + services["grafana"]["ports"][0].rsplit(":", 1)[0]
    head = shlex.split(services["mabrec"]["command"][2])
    worker = services["ray-worker"]["command"]
    port = next(a.split("=")[1] for a in head if a.startswith("--metrics-export-port="))
    assert f"--metrics-export-port={port}" in worker
    jobs = {job["job_name"]: job for job in PROMETHEUS["scrape_configs"]}
    assert f"mabrec:{port}" in jobs["ray"]["static_configs"][0]["targets"]
    assert jobs["ray"]["dns_sd_configs"][0] == {**jobs["ray"]["dns_sd_configs"][0], "names": ["ray-worker"]}
    assert jobs["ray"]["dns_sd_configs"][0]["port"] == int(port)
    assert jobs["mabrec-api"]["static_configs"][0]["targets"] == [f"mabrec:{env['MABREC_PORT']}"]
    assert jobs["mabrec-api"]["metrics_path"] == "/metrics"


# --- the exporters' logic --------------------------------------------------------------------------


def shard_status(**over: Any) -> dict[str, Any]:
    status = {
        "shard": 1,
        "ready": True,
        "users": 12,
        "events_applied": 100,
        "events_duplicate": 3,
        "replayed": 40,
        "covered_seq": 500,
        "checkpoint_seq": 480,
        "dirty_users": 2,
        "last_checkpoint": 1000.0,
    }
    return status | over


def by_name(readings: list[tuple[Spec, dict[str, str], float]]) -> dict[str, float]:
    return {spec.name: value for spec, _, value in readings}


def test_a_shard_status_reads_as_gauges_and_counters_with_its_tag() -> None:
    readings = shard_readings(shard_status(), now=1004.5)
    assert {tuple(tags.items()) for _, tags, _ in readings} == {(("shard", "1"),)}
    values = by_name(readings)
    assert values[RESIDENT_USERS.name] == 12 and values[EVENTS_APPLIED.name] == 100
    assert values["mabrec_shard_duplicate_events"] == 3 and values["mabrec_shard_replayed_events"] == 40
    assert values[CHECKPOINT_LAG_EVENTS.name] == 20
    assert values[CHECKPOINT_LAG_SECONDS.name] == 4.5


def test_checkpoint_lag_is_zero_when_everything_is_checkpointed_or_the_shard_is_not_serving() -> None:
    saved = by_name(shard_readings(shard_status(checkpoint_seq=500, dirty_users=0), now=5000.0))
    assert saved[CHECKPOINT_LAG_EVENTS.name] == 0 and saved[CHECKPOINT_LAG_SECONDS.name] == 0  # idle: not late
    restoring = by_name(shard_readings(shard_status(ready=False, covered_seq=0, checkpoint_seq=-1), now=5000.0))
    assert restoring[CHECKPOINT_LAG_EVENTS.name] == 0 and restoring[CHECKPOINT_LAG_SECONDS.name] == 0
    # Before its first checkpoint, a shard is late from when it became ready.
    first = by_name(shard_readings(shard_status(last_checkpoint=None), now=5000.0, ready_since=4990.0))
    assert first[CHECKPOINT_LAG_SECONDS.name] == 10


def test_router_and_api_statuses_read_as_counters() -> None:
    router = router_readings({"events": 70, "dead_letters": {"not_json": 2, "invalid": 1}})
    assert [(s.name, tags, v) for s, tags, v in router] == [
        ("mabrec_router_routed_events", {}, 70),
        ("mabrec_router_dead_letters", {"reason": "invalid"}, 1),
        ("mabrec_router_dead_letters", {"reason": "not_json"}, 2),
    ]
    assert [(s.name, tags, v) for s, tags, v in api_readings({"api": 0, "fallback_slates": 5})] == [
        ("mabrec_api_fallback_slates", {"api": "0"}, 5)
    ]


def test_the_api_host_reads_its_fallback_count_from_the_apps_counter() -> None:
    metrics = ApiMetrics()
    assert fallback_slates(None) == 0 and fallback_slates(metrics) == 0
    metrics.slates.labels("personal").inc(7)
    metrics.slates.labels("popularity-fallback").inc(3)
    assert fallback_slates(metrics) == 3


def test_counter_deltas_survive_a_restart() -> None:
    deltas = Deltas()
    assert [deltas.step("a", v) for v in (5, 8, 8, 2, 6)] == [5, 3, 0, 2, 4]  # back to 2: restarted, 2 new
    assert deltas.step("b", 1) == 1  # keys are apart


class Recorded:
    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        self.calls: list[tuple[str, float, dict[str, str]]] = []

    def set(self, value: float, tags: dict[str, str]) -> None:
        self.calls.append(("set", value, tags))

    def inc(self, value: float, tags: dict[str, str]) -> None:
        assert value > 0  # Ray refuses anything else
        self.calls.append(("inc", value, tags))

    def observe(self, value: float, tags: dict[str, str]) -> None:
        self.calls.append(("observe", value, tags))


def test_an_exporter_sets_gauges_and_increments_counters_by_what_they_grew() -> None:
    made: dict[str, Recorded] = {}

    def make(spec: Spec) -> Recorded:
        made[spec.name] = Recorded(spec)
        return made[spec.name]

    statuses = iter([shard_status(), shard_status(events_applied=130), shard_status(events_applied=10)])
    exporter = ShardMetrics(1, lambda: next(statuses), make=make)
    for _ in range(3):
        exporter.export()
    exporter.slates_took(0.004)
    assert made[EVENTS_APPLIED.name].calls == [("inc", 100, {"shard": "1"}), ("inc", 30, {"shard": "1"}), ("inc", 10, {"shard": "1"})]  # fmt: skip
    assert made["mabrec_shard_duplicate_events"].calls == [("inc", 3, {"shard": "1"})]  # no growth, no call
    assert [c[:2] for c in made[RESIDENT_USERS.name].calls] == [("set", 12)] * 3
    assert made["mabrec_shard_slate_seconds"].calls == [("observe", 0.004, {"shard": "1"})]


async def test_an_exporter_that_dies_is_logged_and_started_again(caplog: pytest.LogCaptureFixture) -> None:
    broken = True
    exported = asyncio.Event()

    def status() -> dict[str, Any]:
        if broken:
            raise RuntimeError("status is broken")
        exported.set()
        return {"events": 1, "dead_letters": {}}

    exporter = Exporter("router", ray_metrics.ROUTER_SPECS, status, lambda s, now: router_readings(s), 0.01, Recorded)
    with caplog.at_level(logging.ERROR, logger="system.tasks"):
        exporter.ensure()
        for _ in range(100):
            if "background task died" in caplog.text:
                break
            await asyncio.sleep(0.01)
    assert "background task died" in caplog.text and "router metrics" in str(caplog.records[-1].__dict__)
    broken = False
    for _ in range(500):  # the health checks that follow start it again, once its pause has passed
        exporter.ensure()
        if exported.is_set():
            break
        await asyncio.sleep(0.01)
    assert exported.is_set()
    await exporter.stop()
