"""CPU per slate, per process (`mabrec bench cpu`, and the report).

At a steady rate of slates (the API publishes each slate's impressions; a movie opened from the
last slate, a click, every `clicks_every` slates), every process of the running system is
sampled for its CPU time (user + system, psutil) at the start and the end of the measured
window; each process's CPU over the slates served is its cost per slate. Processes are the
descendants of `mabrec up` grouped by role: the shards, the API, the event router, NATS,
PostgreSQL, the supervisor, and Ray's own (GCS, raylet, dashboard, idle workers). The load
generator's own CPU is reported beside, not counted.

Two kinds of users: `new` (each slate for a user never seen, drawn from millions) and
`history` (users prepared with about `rows` state rows each: impressions of slates, a few
clicks, straight onto NATS before the measure), so the cost's growth with a user's history shows.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import orjson
import psutil

from bench import loadtest
from bench.growth import wait_applied
from system.bus import stream
from system.local import admin_token
from system.local.runtime import Runtime

GROUPS = ("shards", "api", "router", "nats", "postgresql", "supervisor", "ray")


def processes(supervisor_pid: int, status: dict[str, Any]) -> dict[int, str]:
    """pid -> group, for `mabrec up` and every process under it."""
    shards = {s["pid"] for s in status.get("shards", []) if s.get("pid")}
    apis = {a["pid"] for a in status.get("apis", []) if a.get("pid")}
    router = (status.get("router") or {}).get("pid")
    root = psutil.Process(supervisor_pid)
    out = {supervisor_pid: "supervisor"}
    for proc in root.children(recursive=True):
        try:
            name = proc.name()
        except psutil.Error:
            continue
        if proc.pid in shards:
            out[proc.pid] = "shards"
        elif proc.pid in apis:
            out[proc.pid] = "api"
        elif proc.pid == router:
            out[proc.pid] = "router"
        elif name.startswith("nats-server"):
            out[proc.pid] = "nats"
        elif name.startswith("postgres"):
            out[proc.pid] = "postgresql"
        else:
            out[proc.pid] = "ray"
    return out


def wakeups(pids: dict[int, str]) -> dict[int, int]:
    """pid -> voluntary context switches so far, over all its threads: each is a thread going
    to sleep to wait for something, so each counts a time it was woken. (psutil reads the main
    thread's only; Ray workers and NATS wait on many.)"""
    out = {}
    for pid in pids:
        total = 0
        try:
            for task in os.scandir(f"/proc/{pid}/task"):
                with open(f"{task.path}/status") as status:
                    total += next(int(line.split()[1]) for line in status if line.startswith("voluntary_ctxt"))
        except (OSError, StopIteration):
            continue  # gone since (or a thread of it): lost to the count
        out[pid] = total
    return out


# A NATS connection's name says whose it is: mabrec-shard-<i>, mabrec-api-<i>, mabrec-router, ...
CONNECTION_GROUPS = {"mabrec-shard-": "shards", "mabrec-api-": "api", "mabrec-router": "router"}


def nats_messages(monitor_url: str | None) -> dict[str, tuple[int, int]] | None:
    """Messages so far, from the NATS server's monitoring endpoint: the server's own (in, out)
    under "nats", and per group of mabrec's connections (sent, received)."""
    if not monitor_url:
        return None
    varz = httpx.get(f"{monitor_url}/varz", timeout=5).json()
    out = {"nats": (int(varz["in_msgs"]), int(varz["out_msgs"]))}
    connz = httpx.get(f"{monitor_url}/connz", params={"limit": 4096}, timeout=5).json()
    for conn in connz.get("connections", []):
        name = conn.get("name") or ""
        group = next((g for prefix, g in CONNECTION_GROUPS.items() if name.startswith(prefix)), "other")
        sent, received = out.get(group, (0, 0))
        out[group] = (sent + int(conn["in_msgs"]), received + int(conn["out_msgs"]))  # the server's in: its sends
    return out


def cpu_seconds(pids: dict[int, str]) -> dict[int, tuple[float, float]]:
    """pid -> (user, system) CPU seconds so far."""
    out = {}
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            out[pid] = (t.user, t.system)
        except psutil.Error:
            continue  # gone since: its CPU is lost to the measure, as it is to the machine
    return out


async def prepare_history(
    api_url: str, nats_url: str, subject: str, *, users: int, rows: int, movie_ids: list[int], prefix: str
) -> dict[str, Any]:
    """Give users `<prefix>0` .. about `rows` state rows each (impressions of slates of 10 and a
    click per 10 slates), straight onto the stream; returns when every shard applied them, with
    the rows a user ended with (measured on a few of them)."""
    rng = np.random.default_rng(11)
    ids = np.asarray(movie_ids)
    nc = await stream.connect(nats_url, "bench-cpu")
    js = nc.jetstream()
    slates = max(1, (rows - 20) // 10)  # a slate adds about 10 movies; the 21 genres come first
    last, batch = 0, []
    try:
        for u in range(users):
            for k in range(slates):
                picks = ids[rng.choice(len(ids), size=10, replace=False)].tolist()  # distinct
                batch.append({"event_type": "seen", "user_id": f"{prefix}{u}", "entity_ids": picks})
                if k % 10 == 0:
                    batch.append({"event_type": "clicked", "user_id": f"{prefix}{u}", "entity_ids": picks[:1]})
            if len(batch) >= 500 or u == users - 1:  # a message carries at most MAX_BATCH events
                last = max(last, int((await js.publish(subject, orjson.dumps(batch))).seq))
                batch = []
    finally:
        await nc.close()
    await wait_applied(api_url, last)
    async with httpx.AsyncClient(base_url=api_url, headers=admin_token.headers(api_url), timeout=30) as http:
        sizes = []
        for u in range(0, users, max(1, users // 20)):
            profile = (await http.get("/api/profile", headers={"uxid": f"{prefix}{u}"})).json()
            sizes.append(len(profile["movies"]) + len(profile["facets"]))
    if not min(sizes):
        raise RuntimeError(f"users were not prepared (state rows {sizes}): see the router's dead letters")
    return {"users": users, "rows_mean": round(float(np.mean(sizes)), 1), "rows_max": int(max(sizes))}


async def measure(
    api_url: str,
    supervisor_pid: int,
    *,
    rate: float = 1000,
    duration: float = 15.0,
    warmup: float = 3.0,
    users: int = 2_000_000,
    zipf: float | None = None,
    prefix: str = "bench-",
    clicks_every: int = 10,
    movie_ids: list[int] | None = None,
    progress: Callable[[float], None] | None = None,
    nats_monitor: str | None = None,
) -> dict[str, Any]:
    """CPU per slate per process group at `rate` slates/s (milliseconds of CPU per slate), and
    what a slate sets moving: the times each group was woken, the messages NATS took and gave."""
    async with httpx.AsyncClient(base_url=api_url, headers=admin_token.headers(api_url), timeout=30) as http:
        status = (await http.get("/api/status")).json()
    pids = processes(supervisor_pid, status)
    me = psutil.Process(os.getpid())
    mix = loadtest.Mix(recommend=clicks_every, open_movie=1)
    load = asyncio.create_task(
        loadtest.run(
            api_url,
            clients=64,
            rate=rate * (clicks_every + 1) / clicks_every,  # slates at `rate`, clicks on top
            duration=duration,
            warmup=warmup,
            users=users,
            zipf=zipf,
            prefix=prefix,
            mix=mix,
            movie_ids=movie_ids,
            progress=progress,
        )
    )
    await asyncio.sleep(warmup)
    woken_before, messages_before = wakeups(pids), nats_messages(nats_monitor)
    before, mine_before, began = cpu_seconds(pids), sum(me.cpu_times()[:2]), time.perf_counter()
    summed_before = await digests_summed(api_url)
    await asyncio.sleep(duration)
    after, mine_after, elapsed = cpu_seconds(pids), sum(me.cpu_times()[:2]), time.perf_counter() - began
    woken_after, messages_after = wakeups(pids), nats_messages(nats_monitor)
    summed = await digests_summed(api_url) - summed_before
    results = await load
    slates = results["recommend"].requests if "recommend" in results else 0
    if not slates:
        raise RuntimeError("no slate was served during the measure")
    by_group = dict.fromkeys(GROUPS, 0.0)
    kernel = dict.fromkeys(GROUPS, 0.0)
    for pid, (user, system) in after.items():
        was_user, was_system = before.get(pid, (0.0, 0.0))
        by_group[pids[pid]] += user - was_user + system - was_system
        kernel[pids[pid]] += system - was_system
    per_slate = {group: round(1000 * seconds / slates, 4) for group, seconds in by_group.items()}
    woken = dict.fromkeys(GROUPS, 0)
    for pid, count in woken_after.items():
        woken[pids[pid]] += count - woken_before.get(pid, count)
    messages: dict[str, Any] | None = None
    if messages_before and messages_after:
        delta = {
            group: [round((a - b) / slates, 2) for a, b in zip(after_, messages_before.get(group, (0, 0)), strict=True)]
            for group, after_ in messages_after.items()
        }  # a connection made during the window counts from 0: the router's, a restarted shard's
        messages = {"in": delta["nats"][0], "out": delta["nats"][1]}
        messages["by_process"] = {g: {"sent": d[0], "received": d[1]} for g, d in delta.items() if g != "nats"}
    return {
        "slates": slates,
        "slates_per_s": round(slates / elapsed),
        "errors": sum(r.errors for r in results.values()),
        "p50_ms": results["recommend"].as_dict()["p50_ms"],
        "p99_ms": results["recommend"].as_dict()["p99_ms"],
        "cpu_ms_per_slate": round(sum(per_slate.values()), 4),
        "by_process_ms": per_slate,
        "in_kernel_ms": {group: round(1000 * seconds / slates, 4) for group, seconds in kernel.items()},
        "machine_busy": round(sum(by_group.values()) / elapsed / (psutil.cpu_count() or 1), 3),
        "load_generator_ms": round(1000 * (mine_after - mine_before) / slates, 4),
        # Passes over a user's history at a slate (their digest summed again), per slate.
        "digest_sums_per_slate": round(summed / slates, 4),
        # A slate's moving parts, counted: times each group was woken, NATS messages (with the
        # click per `clicks_every` slates and everything else under way: the system's rate).
        "wakeups_per_slate": {group: round(n / slates, 2) for group, n in woken.items()},
        "nats_messages_per_slate": messages,
    }


async def digests_summed(api_url: str) -> int:
    """The shards' count of digests summed afresh, as the supervisor last saw it (a second old)."""
    async with httpx.AsyncClient(base_url=api_url, headers=admin_token.headers(api_url), timeout=30) as http:
        status = (await http.get("/api/status")).json()
    return sum(int(s.get("digests_summed") or 0) for s in status.get("shards", []))


async def both(
    runtime: Runtime,
    *,
    rate: float,
    duration: float,
    rows: int,
    movie_ids: list[int],
    users: int = 10_000,
    warmup: float = 3.0,
) -> dict[str, Any]:
    """CPU per slate for new users, then (unless `rows` is 0) for users with about `rows` state rows."""
    monitor = next((s.monitor_url for s in runtime.services if s.name == "nats"), None)
    out: dict[str, Any] = {
        "new": await measure(
            runtime.api_url,
            runtime.supervisor_pid,
            rate=rate,
            duration=duration,
            movie_ids=movie_ids,
            warmup=warmup,
            nats_monitor=monitor,
        )
    }
    if rows:
        prefix = f"hist{rows}-"
        out["history"] = await prepare_history(
            runtime.api_url, runtime.nats_url, f"{runtime.namespace}.events",
            users=users, rows=rows, movie_ids=movie_ids, prefix=prefix,
        )  # fmt: skip
        # A warm-up in which every one of them asks for a slate: measured is a user who comes
        # back (their first slate after their history arrived sums it once, whatever the code).
        out["history"] |= await measure(
            runtime.api_url, runtime.supervisor_pid, rate=rate, duration=duration, users=users, prefix=prefix,
            movie_ids=movie_ids, warmup=max(warmup, 2.5 * users / rate), nats_monitor=monitor,
        )  # fmt: skip
    return out
