"""mabrec's entry point: the `mabrec` CLI and the supervisor that `mabrec up` runs.

`mabrec up` prepares the infrastructure (embedded servers where no URL is configured), applies
migrations, loads the catalog on first start, starts or attaches Ray, and creates the actors:
shards, the event router, and the API hosts. Then it watches: every second it makes sure each
actor is up (restoring or restarting it), pushes the shards' health to the API, shares global
popularity between shards, and reloads a changed catalog. The actors are detached: if the
supervisor dies they go on serving, and a new `mabrec up` re-attaches to them. SIGINT/SIGTERM
stop everything cleanly: final checkpoints, NATS drained, embedded servers stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from system import bus, commands, db
from system.embedded import Runtime, free_port, pid_alive, ray_environment, ray_token
from system.errors import ServiceError, Unavailable
from system.health import HealthMonitor
from system.infra import Infrastructure
from system.logs import setup_logging
from system.settings import Settings
from system.sharding import SlotMap
from system.store import CatalogStore, StateStore

log = logging.getLogger("mabrec.supervisor")

POPULARITY_PERIOD = 5.0
CATALOG_PERIOD = 2.0


async def _every(period: float, name: str, job: Callable[[], Awaitable[None]]) -> None:
    """Run `job` forever; a failure is logged and never ends the loop."""
    while True:
        await asyncio.sleep(period)
        try:
            await job()
        except Exception as exc:
            log.warning("periodic job failed", extra={"job": name, "error": repr(exc)})


async def up(settings: Settings) -> int:
    """Run the whole system until SIGINT/SIGTERM."""
    os.environ.update(_ray_env(settings))  # Ray reads these when it is imported
    from actors import ray_api  # Ray is imported only by the commands that use it

    began = time.monotonic()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()

    def handle_signals() -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stopping.set)

    handle_signals()
    previous = Runtime.load(settings.state_dir)
    if previous and previous.supervisor_pid != os.getpid() and pid_alive(previous.supervisor_pid):
        log.error("another supervisor runs from this state directory", extra={"pid": previous.supervisor_pid})
        return 1
    infra = await asyncio.to_thread(Infrastructure.start, settings)
    settings = infra.settings
    tasks: list[asyncio.Task[Any]] = []
    try:
        await commands.prepare_database(settings)
        pool = await db.open_pool(settings.database_url or "", name="supervisor")
        nc = await bus.connect(settings.nats_url or "", f"{settings.namespace}-supervisor")
        js = nc.jetstream()
        await bus.ensure_streams(js, settings)
        info = await js.stream_info(settings.stream)
        state_store, catalog_store = StateStore(pool), CatalogStore(pool)
        await state_store.check_event_log(settings.stream, info.created, info.state.last_seq)
        slot_map = await state_store.ensure_slot_map(settings.shards)

        dashboard = ray_api.connect(settings, settings.ray_address or "")  # ~1 s; on the main thread, as Ray wants
        handle_signals()  # ray.init installed its own SIGTERM handler: ours must win (checkpoints first)
        cluster = ray_api.Cluster(settings)
        if slot_map.shards != settings.shards:
            slot_map = await _reshard_offline(cluster, state_store, slot_map, settings.shards)
        port = settings.port or (urlsplit(previous.api_url).port if previous else None) or free_port()
        cluster.spawn(settings.shards, settings.api_workers, port)
        health = HealthMonitor(cluster, settings.shards, settings.api_workers)
        extra: dict[str, Any] = {"ray_dashboard": infra.dashboard_url or dashboard, "stream_last_seq": 0}
        told_version: list[int | None] = [None]  # the catalog version the actors were last told about

        async def push_health(monitor: HealthMonitor) -> None:
            snapshot = {**monitor.snapshot(), **extra}
            await asyncio.gather(
                *(cluster.api(a, "set_health", snapshot) for a in range(settings.api_workers)), return_exceptions=True
            )

        async def share_popularity() -> None:
            await _share_popularity(cluster, settings, await catalog_store.version())

        async def watch_catalog() -> None:
            # Every actor reloads only if its catalog is not this version (cheap when it is), so
            # the first round also fixes actors that outlived a supervisor during a catalog load.
            version = await catalog_store.version()
            if version != told_version[0]:
                log.info("catalog version %s: telling the actors", version)
                results = await asyncio.gather(
                    *(cluster.shard(s, "reload_catalog", timeout=30) for s in range(settings.shards)),
                    cluster.route("reload", timeout=30),
                    *(cluster.api(a, "reload_catalog", timeout=30) for a in range(settings.api_workers)),
                    return_exceptions=True,
                )
                if not any(isinstance(r, BaseException) for r in results):
                    told_version[0] = version

        async def watch_stream() -> None:
            extra["stream_last_seq"] = await bus.last_seq(js, settings.stream)

        tasks += [
            asyncio.create_task(health.run(after_check=push_health), name="health"),
            asyncio.create_task(_every(POPULARITY_PERIOD, "popularity", share_popularity)),
            asyncio.create_task(_every(CATALOG_PERIOD, "catalog", watch_catalog)),
            asyncio.create_task(_every(1.0, "stream", watch_stream)),
        ]
        while not health.all_ready and not stopping.is_set():
            await asyncio.sleep(0.05)
        api_port = next((a.get("port") for a in health.apis.values() if a.get("port")), port)
        api_url = f"http://{settings.host}:{api_port}"
        Runtime(
            supervisor_pid=os.getpid(),
            api_url=api_url,
            database_url=settings.database_url or "",
            nats_url=settings.nats_url or "",
            ray_address=settings.ray_address or "",
            namespace=settings.namespace,
            dashboard_url=extra["ray_dashboard"],
            services=infra.services,
        ).save(settings.state_dir)
        await push_health(health)
        if not stopping.is_set():
            seconds = round(time.monotonic() - began, 2)
            log.info("mabrec is ready", extra={"api": api_url, "shards": settings.shards, "seconds": seconds})
            dashboard_note = extra["ray_dashboard"] or "off"
            if infra.dashboard_url:  # the local Ray we started: its dashboard asks for the token
                dashboard_note += f" (token in {ray_token(settings.state_dir)})"
            print(
                f"mabrec is up: API {api_url}  docs {api_url}/docs  Ray dashboard {dashboard_note}",
                file=sys.stderr,
                flush=True,
            )
        await stopping.wait()

        log.info("shutting down")
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await _stop_actors(cluster, settings.shards, settings.api_workers)
        await nc.drain()
        await pool.close()
        return 0
    except BaseException:
        log.exception("mabrec up failed; stopping what it started")
        raise
    finally:
        for task in tasks:
            task.cancel()
        ray_api.disconnect()  # before Ray's servers stop, or the driver waits on them
        Runtime.remove(settings.state_dir)
        infra.stop()  # blocking on purpose: the loop may be going down, the servers must not stay up


async def _stop_actors(cluster: Any, shards: int, apis: int) -> None:
    """Graceful: the API stops taking requests and flushes its events, the router stops, every
    shard takes its final checkpoint; then the actors are removed."""
    await asyncio.gather(*(cluster.api(a, "stop", timeout=15) for a in range(apis)), return_exceptions=True)
    with contextlib.suppress(ServiceError):
        await cluster.route("stop", timeout=10)
    results = await asyncio.gather(
        *(cluster.shard(s, "stop", timeout=60) for s in range(shards)), return_exceptions=True
    )
    for shard, result in enumerate(results):
        if isinstance(result, BaseException):
            log.error("final checkpoint failed", extra={"shard": shard, "error": repr(result)})
    cluster.kill_all()


async def _share_popularity(cluster: Any, settings: Settings, version: int) -> None:
    """Sum every shard's popularity counts and send the total back: all shards (and the API's
    fallback) rank with the whole population's evidence, not just their own users'."""
    results = await asyncio.gather(
        *(cluster.shard(s, "popularity") for s in range(settings.shards)), return_exceptions=True
    )
    parts = [r for r in results if not isinstance(r, BaseException) and r[0] == version]
    if not parts:
        return
    clicks = np.sum([p[1] for p in parts], axis=0)
    seen = np.sum([p[2] for p in parts], axis=0)
    await asyncio.gather(
        *(cluster.shard(s, "set_popularity", version, clicks, seen) for s in range(settings.shards)),
        *(cluster.api(a, "set_popularity", version, clicks, seen) for a in range(settings.api_workers)),
        return_exceptions=True,
    )


async def _reshard_offline(cluster: Any, store: StateStore, old: SlotMap, shards: int) -> SlotMap:
    """A changed shard count at start: stop the actors of the old layout if they still run
    (final checkpoints), then assign the slots evenly. Users move with their slots, and each
    slot keeps its checkpoint position, so nothing is lost or applied twice."""
    log.info("re-sharding", extra={"from": old.shards, "to": shards})
    with contextlib.suppress(Unavailable):
        await cluster.route("stop", timeout=10)
    for name in _actor_names(cluster, old.shards):
        with contextlib.suppress(Unavailable):
            await cluster.call(name, "stop", timeout=60)
    cluster.kill_all()
    new = SlotMap.even(shards)
    await store.assign_slots(new)
    return new


def _actor_names(cluster: Any, shards: int) -> list[str]:
    from actors.ray_api import api_name, shard_name

    found = []
    for name in [api_name(cluster.settings, a) for a in range(64)] + [
        shard_name(cluster.settings, s) for s in range(shards)
    ]:
        with contextlib.suppress(Unavailable):
            cluster.handle(name)
            found.append(name)
    return found


async def verify(settings: Settings, as_json: bool, timeout: float) -> int:
    """`mabrec verify` against the system started from this directory (or the configured URLs)."""
    import orjson

    runtime = Runtime.load(settings.state_dir)
    if runtime is not None:
        settings = replace(
            settings,
            database_url=settings.database_url or runtime.database_url,
            nats_url=settings.nats_url or runtime.nats_url,
            ray_address=settings.ray_address or runtime.ray_address,
            namespace=runtime.namespace,
        )
    if not (settings.database_url and settings.nats_url and settings.ray_address):
        print(
            "mabrec verify: no running system here (start one with `mabrec up`) and no URLs configured", file=sys.stderr
        )
        return 2
    local_ray = runtime is not None and any(s.name == "ray" for s in runtime.services)
    os.environ.update(_ray_env(replace(settings, ray_address=None) if local_ray else settings))
    from actors import ray_api
    from actors.verify import verify as recount_and_compare

    ray_api.connect(settings, settings.ray_address or "")
    try:
        cluster = ray_api.Cluster(settings)
        pool = await db.open_pool(settings.database_url or "", name="verify")
        try:
            shards = (await StateStore(pool).slot_map()).shards
        finally:
            await pool.close()
        report = await recount_and_compare(
            settings, lambda shard: cluster.shard(shard, "export", timeout=60), shards, catch_up_timeout=timeout
        )
    finally:
        ray_api.disconnect()
    if as_json:
        print(orjson.dumps(report.as_dict(), option=orjson.OPT_INDENT_2).decode())
    else:
        print(
            f"recounted {report.events} events of stream {report.stream} (through #{report.through}) in {report.seconds:.1f}s"
        )
        print(f"live state:   {report.live.users} users checked, {report.live.mismatches} mismatches")
        print(f"checkpoints:  {report.checkpoints.users} users checked, {report.checkpoints.mismatches} mismatches")
        for line in report.lagging + report.live.examples + report.checkpoints.examples:
            print(f"  {line}")
        print("OK: every posterior equals the recount" if report.ok else "MISMATCH")
    return 0 if report.ok else 1


def _ray_env(settings: Settings) -> dict[str, str]:
    env = {"RAY_USAGE_STATS_ENABLED": "0"}
    if not settings.ray_address:  # our own local Ray: private, loopback-only, token-authenticated
        env.update(ray_environment(settings.state_dir))
    return env


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mabrec",
        description="Real-time movie recommendations with Thompson-sampling bandits on Ray, NATS JetStream and PostgreSQL.",
        epilog="Configuration comes from the environment (DATABASE_URL, NATS_URL, RAY_ADDRESS, MABREC_*); see the README.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p_up = sub.add_parser("up", help="run everything: embedded servers as needed, Ray shards, consumer, API")
    p_up.add_argument("--shards", type=int, help="number of shard actors (MABREC_SHARDS, default 4)")
    p_up.add_argument("--host", help="API bind address (MABREC_HOST, default 127.0.0.1)")
    p_up.add_argument("--port", type=int, help="API port (MABREC_PORT, default 8000; 0 picks a free one)")
    p_up.add_argument("--no-dashboard", action="store_true", help="do not start the Ray dashboard (local Ray only)")

    p_status = sub.add_parser("status", help="show the running system (started by `mabrec up` from this directory)")
    p_status.add_argument("--json", action="store_true", help="print JSON")

    p_catalog = sub.add_parser("catalog", help="catalog commands")
    catalog_sub = p_catalog.add_subparsers(dest="catalog_command", required=True, metavar="ACTION")
    p_load = catalog_sub.add_parser(
        "load", help="load a CSV or JSONL catalog (any facet columns); learned state is kept"
    )
    p_load.add_argument("file", type=Path, help=".csv or .jsonl, optionally .gz")
    p_load.add_argument("--merge", action="store_true", help="keep movies that are not in the file (default: replace)")

    p_verify = sub.add_parser(
        "verify", help="recount every user's state from the event log; compare with live shards and checkpoints"
    )
    p_verify.add_argument("--json", action="store_true", help="print JSON")
    p_verify.add_argument(
        "--timeout", type=float, default=30.0, help="seconds to wait for shards to catch up (default 30)"
    )

    p_sim = sub.add_parser(
        "simulate", help="compare the policy with baselines on synthetic users (see docs/simulation)"
    )
    p_sim.add_argument(
        "--policies", default=",".join(("mabrec", "original", "popularity", "epsilon-greedy", "ucb1", "random"))
    )
    p_sim.add_argument("--seeds", type=int, default=5, help="independent worlds (default 5)")
    p_sim.add_argument("--seed", type=int, default=0, help="the first seed: the same seeds give the same numbers")
    p_sim.add_argument("--users", type=int, default=1000)
    p_sim.add_argument("--rounds", type=int, default=200)
    p_sim.add_argument("--shift-at", type=int, help="re-draw every user's genre tastes at this round")
    p_sim.add_argument(
        "--output", type=Path, default=Path("docs/simulation"), help="report, table and plots (default docs/simulation)"
    )
    p_sim.add_argument("--url", help="drive a running service over HTTP instead (mabrec's policy only)")

    p_bench = sub.add_parser("bench", help="benchmarks and load tests (see BENCHMARKS.md)")
    bench_sub = p_bench.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
    p_http = bench_sub.add_parser("http", help="load-test the running system's API (closed or open loop)")
    p_http.add_argument("--url", help="API base URL (default: the system started from this directory)")
    p_http.add_argument(
        "--clients", type=int, default=32, help="connections; closed loop: concurrent clients (default 32)"
    )
    p_http.add_argument("--rate", type=float, help="open loop: requests per second, whatever the answers")
    p_http.add_argument("--duration", type=float, default=10.0, help="measured seconds (default 10)")
    p_http.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first (default 2)")
    p_http.add_argument("--users", type=int, default=100_000, help="distinct users, drawn Zipf(1.1) (default 100000)")
    p_http.add_argument("--mix", default="recommend=1", help="request shares, e.g. recommend=8,open=1,list=1")
    p_http.add_argument("--json", type=Path, help="write the JSON report here")
    p_ingest = bench_sub.add_parser("ingest", help="publish events to JetStream at a fixed rate; applied rate and lag")
    p_ingest.add_argument("--url", help="API base URL (default: the system started from this directory)")
    p_ingest.add_argument("--rate", type=float, default=20_000, help="events per second (default 20000)")
    p_ingest.add_argument("--duration", type=float, default=10.0, help="seconds of publishing (default 10)")
    p_ingest.add_argument("--per-message", type=int, default=100, help="events per NATS message (default 100)")
    p_click = bench_sub.add_parser("click", help="how soon a click reaches the user's state, under background load")
    p_click.add_argument("--url", help="API base URL (default: the system started from this directory)")
    p_click.add_argument("--probes", type=int, default=200, help="clicks to time (default 200)")
    p_click.add_argument("--rate", type=float, default=1000, help="background requests per second (default 1000)")
    p_memory = bench_sub.add_parser("memory", help="memory of N users' state, in-process")
    p_memory.add_argument("--users", type=int, default=1_000_000)
    p_memory.add_argument("--movies", type=int, default=20, help="touched movies per user (default 20)")
    p_memory.add_argument("--shards", type=int, default=4)
    bench_sub.add_parser("policy", help="microseconds per slate, in-process")
    p_report = bench_sub.add_parser("report", help="start a fresh system, run every benchmark, write BENCHMARKS.md")
    p_report.add_argument("--shards", type=int, default=4)
    p_report.add_argument(
        "--also-shards", type=int, nargs="*", default=[], help="closed-loop runs with these shard counts too"
    )
    p_report.add_argument("--no-dashboard", action="store_true")
    p_report.add_argument("--quick", action="store_true", help="short runs (a smoke test, not numbers to quote)")
    p_report.add_argument("--output", type=Path, default=Path("BENCHMARKS.md"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        overrides: dict[str, Any] = {}
        if args.command == "up":
            overrides = {
                "shards": args.shards,
                "host": args.host,
                "port": args.port,
                "dashboard": False if args.no_dashboard else None,
            }
        settings = Settings.from_env(**overrides)
    except ServiceError as exc:
        print(f"mabrec: configuration error: {exc.detail}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level, "supervisor")
    try:
        if args.command == "up":
            return asyncio.run(up(settings))
        if args.command == "status":
            return commands.status(settings, args.json)
        if args.command == "verify":
            return asyncio.run(verify(settings, args.json, args.timeout))
        if args.command == "bench":
            return commands.bench(settings, args)
        if args.command == "simulate":
            from sim.command import simulate

            return simulate(args)
        if args.command == "catalog" and args.catalog_command == "load":
            if not args.file.exists():
                print(f"mabrec: no such file: {args.file}", file=sys.stderr)
                return 2
            return asyncio.run(commands.catalog_load(settings, args.file, args.merge))
    except ServiceError as exc:
        print(f"mabrec: {exc.detail}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
