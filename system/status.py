"""`mabrec status`: the system started from this directory, as its API and runtime file tell it."""

from __future__ import annotations

import sys
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson

from system.core.settings import Settings
from system.local import admin_token
from system.local.processes import pid_alive
from system.local.runtime import Runtime
from system.local.secret_files import redacted


def show(settings: Settings, as_json: bool) -> int:
    """Print the status; exit code 0 when ready, 2 when not, 1 when nothing answers."""
    runtime = Runtime.load(settings.state_dir)
    if runtime is None:
        print(f"mabrec is not running here (no {settings.state_dir}/runtime.json)", file=sys.stderr)
        return 1
    supervisor = "running" if pid_alive(runtime.supervisor_pid) else "DOWN (the API and actors go on without it)"
    try:
        answer = httpx.get(
            f"{runtime.api_url}/api/status", headers=admin_token.headers(runtime.api_url, settings), timeout=5
        )
        if answer.status_code in (401, 403):
            print(f"mabrec's API refused the admin token: {answer.json().get('detail')}", file=sys.stderr)
            return 1
        status = answer.json()
        ready = httpx.get(f"{runtime.api_url}/readyz", timeout=5).json()
    except httpx.HTTPError as exc:
        print(f"mabrec's API at {runtime.api_url} does not answer: {exc} (supervisor {supervisor})", file=sys.stderr)
        return 1
    if as_json:
        out = {
            "ready": ready,
            "supervisor": {"pid": runtime.supervisor_pid, "alive": pid_alive(runtime.supervisor_pid)},
            **status,
        }
        print(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode())
        return 0 if ready.get("ready") else 2
    print(
        f"mabrec  {'READY' if ready.get('ready') else 'NOT READY'}   supervisor pid {runtime.supervisor_pid} {supervisor}"
        f"   api up {status['uptime']}s"
    )
    print(f"  api        {runtime.api_url}  (docs {runtime.api_url}/docs)")
    print(f"  dashboard  {runtime.dashboard_url or 'off'}")
    print(f"  metrics    {runtime.metrics_url or 'off'}  (Ray's export: Ray's and mabrec's figures)")
    print(f"  postgres   {redacted(runtime.database_url)}")
    print(f"  nats       {redacted(runtime.nats_url)}   stream last seq {status['stream_last_seq']}")
    print(f"  ray        {runtime.ray_address}")
    print(f"  catalog    version {status['catalog']['version']}, {status['catalog']['movies']} movies")
    router = status["router"]
    print(
        f"  router     {'running' if router.get('running') else 'DOWN'}  position {router.get('position', 0)}"
        f"  events {router.get('events', 0)}  dead-lettered {sum((router.get('dead_letters') or {}).values())}"
    )
    publisher = status["publisher"]
    print(f"  publisher  published {publisher['published']}  pending {publisher['pending']}")
    change = status.get("change")
    if change:
        print(f"  CHANGING   {change['what']}: {change['moved']}/{change['slots']} slots moved, {change['seconds']} s")
    failed = status.get("change_failed")
    if failed:
        print(
            f"  FAILED     {failed['what']} (attempt {failed['attempts']}): {failed['why']}\n"
            f"             every slot is served (the old layout, or the new one if the map changed); tried again in"
            f" {failed['retry_in_seconds']:.0f} s; `mabrec scale --cancel` gives up"
        )
    slots = slots_per_shard(status)
    print("  shard  ready  slots  users    applied  covered  checkpointed  restarts  failures")
    for s in status["shards"]:
        failures = ", ".join(f"{k} {n}" for k, n in sorted((s.get("failures") or {}).items())) or "-"
        print(
            f"  {s['shard']:>5}  {'yes' if s.get('ready') else 'NO ':>5}  {slots.get(s['shard'], 0):>5}"
            f"  {s.get('users', 0):>6}  {s.get('events_applied', 0):>8}  {s.get('covered_seq', 0):>7}"
            f"  {s.get('checkpoint_seq', 0):>12}  {s.get('restarts', 0):>8}  {failures}"
        )
        if s.get("broken"):
            print(f"         BROKEN: {s['broken']} (the supervisor replaces it; restarts back off)")
    return 0 if ready.get("ready") else 2


def slots_per_shard(status: dict[str, Any]) -> dict[int, int]:
    counts: dict[int, int] = {}
    for owner in status.get("slot_owners") or []:
        counts[owner] = counts.get(owner, 0) + 1
    return dict(sorted(counts.items()))


def prometheus_config(settings: Settings) -> str | None:
    """A Prometheus configuration that scrapes the system started from this directory: the API's
    /metrics and Ray's metrics export (Ray's and mabrec's figures), every 5 s. None when it does
    not run here. (compose has its own: deploy/prometheus/prometheus.yml.)"""
    runtime = Runtime.load(settings.state_dir)
    if runtime is None:
        return None
    targets = [("mabrec-api", urlsplit(runtime.api_url).netloc)]
    if runtime.metrics_url:
        targets.append(("ray", urlsplit(runtime.metrics_url).netloc))
    jobs = "".join(
        f"  - job_name: {job}\n    static_configs:\n      - targets: ['{target}']\n" for job, target in targets
    )
    return f"# mabrec prometheus-config: the system of {settings.state_dir}\nglobal:\n  scrape_interval: 5s\nscrape_configs:\n{jobs}"
