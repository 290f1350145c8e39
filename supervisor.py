"""mabrec's entry point: the `mabrec` CLI and the supervisor that `mabrec up` runs.

The supervisor prepares the infrastructure (embedded servers where no URL is configured),
applies migrations, loads the catalog on first start, starts or attaches Ray, creates the shard
actors and the event consumer, serves the API, and then watches: it restores or restarts actors,
shares popularity between shards and reloads a changed catalog. SIGINT/SIGTERM stop it cleanly:
final checkpoints, NATS drained, embedded servers stopped.
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
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import uvicorn

from api.app import create_app
from api.render import Rendered
from system import bus, db
from system.catalog import read_movies
from system.embedded import Runtime, pid_alive
from system.errors import ServiceError
from system.events import Event
from system.health import HealthMonitor
from system.infra import Infrastructure
from system.logs import setup_logging
from system.policy import Model, PolicyConfig, recommend
from system.settings import Settings
from system.store import CatalogStore, StateStore

log = logging.getLogger("mabrec.supervisor")

DEFAULT_CATALOG = Path(__file__).resolve().parent / "data" / "catalog.csv.gz"
POPULARITY_PERIOD = 5.0
CATALOG_PERIOD = 2.0


class LiveBackend:
    """The API's backend in production: Ray shards through the gateway, NATS through the publisher."""

    def __init__(
        self, settings: Settings, rendered: Rendered, gateway: Any, publisher: bus.Publisher, health: HealthMonitor
    ) -> None:
        self.settings = settings
        self.gateway = gateway
        self.publisher = publisher
        self.health = health
        self.policy = PolicyConfig()
        self.rng = np.random.default_rng()
        self.stream_last_seq = 0
        self.started = time.time()
        self.dashboard_url: str | None = None
        self.set_catalog(rendered)

    @property
    def catalog(self) -> Rendered:
        return self._rendered

    def set_catalog(self, rendered: Rendered) -> None:
        self._rendered = rendered
        self.model = Model(rendered.catalog, self.policy)

    def set_popularity(self, clicks: np.ndarray, seen: np.ndarray) -> None:
        self.model = Model(self._rendered.catalog, self.policy, clicks, seen)

    async def recommend(self, uxid: str, limit: int) -> list[int]:
        return await self.gateway.recommend(uxid, limit)  # type: ignore[no-any-return]

    async def profile(self, uxid: str) -> list[list[int]]:
        return await self.gateway.profile(uxid)  # type: ignore[no-any-return]

    def fallback(self, limit: int) -> list[int]:
        empty = self.model.view(np.zeros((0, 3), dtype=np.int32))
        slate = recommend(self.model, empty, limit, self.rng)
        return self.catalog.catalog.movie_ids[slate.movies].tolist()  # type: ignore[no-any-return]

    def publish(self, events: Sequence[Event]) -> bool:
        if self.publisher.pending + len(events) > self.publisher.max_buffer:
            return False
        subject = f"{self.settings.events_subject}.api"
        return all(self.publisher.submit(subject, e.encode(), e.event_id or "") for e in events)

    def readiness(self) -> dict[str, Any]:
        shards = {str(s["shard"]): bool(s.get("ready")) for s in self.health.shards.values()}
        consumer = bool(self.health.consumer.get("running"))
        catalog = len(self._rendered.catalog) > 0
        return {
            "ready": all(shards.values()) and consumer and catalog,
            "catalog": catalog,
            "consumer": consumer,
            "shards": shards,
        }

    def status(self) -> dict[str, Any]:
        return {
            "uptime": round(time.time() - self.started, 1),
            "namespace": self.settings.namespace,
            "catalog": {"version": self._rendered.catalog.version, "movies": len(self._rendered.catalog)},
            "shards": list(self.health.shards.values()),
            "consumer": self.health.consumer,
            "publisher": {
                "pending": self.publisher.pending,
                "published": self.publisher.published,
                "failures": self.publisher.failures,
                "last_error": self.publisher.last_error,
            },
            "stream_last_seq": self.stream_last_seq,
            "ray_dashboard": self.dashboard_url,
        }


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):  # type: ignore[no-untyped-def]
        yield  # the supervisor owns SIGINT/SIGTERM: it must checkpoint before anything stops


async def _every(period: float, name: str, job: Callable[[], Awaitable[None]]) -> None:
    """Run `job` forever; a failure is logged and never ends the loop."""
    while True:
        await asyncio.sleep(period)
        try:
            await job()
        except Exception as exc:
            log.warning("periodic job failed", extra={"job": name, "error": repr(exc)})


async def load_catalog_file(store: CatalogStore, path: Path, *, replace_all: bool = True) -> Any:
    """Parse (in a thread) and COPY a catalog file, with a progress bar on a terminal."""
    from tqdm import tqdm

    movies = await asyncio.to_thread(lambda: list(read_movies(path)))
    with tqdm(total=len(movies), unit="movie", desc=f"loading {path.name}", disable=not sys.stderr.isatty()) as bar:
        return await store.load(movies, source=str(path), replace=replace_all, progress=bar.update)


async def prepare_database(settings: Settings) -> None:
    """Migrations, then the default (or configured) catalog on first start."""
    await db.migrate(settings.database_url or "")
    pool = await db.open_pool(settings.database_url or "", name="supervisor")
    try:
        store = CatalogStore(pool)
        if await store.version() == 0:
            path = settings.catalog_file or DEFAULT_CATALOG
            result = await load_catalog_file(store, path)
            log.info("catalog loaded", extra={"file": str(path), "movies": result.movies, "facets": result.facets})
    finally:
        await pool.close()


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
        await prepare_database(settings)
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
        cluster.spawn(settings.shards)

        health = HealthMonitor(cluster, settings.shards)
        publisher = bus.Publisher(js)
        publisher.start()
        rendered = await asyncio.to_thread(Rendered, await catalog_store.read())
        backend = LiveBackend(settings, rendered, ray_api.ShardGateway(cluster, slot_map), publisher, health)
        backend.dashboard_url = infra.dashboard_url or dashboard

        server = _Server(
            uvicorn.Config(
                create_app(backend),
                host=settings.host,
                port=settings.port,
                log_config=None,
                access_log=False,
                lifespan="on",
                timeout_graceful_shutdown=5,
            )
        )
        tasks.append(asyncio.create_task(server.serve(), name="api"))
        while not server.started:
            if tasks[0].done():
                tasks[0].result()  # the port is taken, say: raise
                raise RuntimeError("the API server exited before it started")
            await asyncio.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1] if server.servers else settings.port
        api_url = f"http://{settings.host}:{port}"
        Runtime(
            supervisor_pid=os.getpid(),
            api_url=api_url,
            database_url=settings.database_url or "",
            nats_url=settings.nats_url or "",
            ray_address=settings.ray_address or "",
            namespace=settings.namespace,
            dashboard_url=backend.dashboard_url,
            services=infra.services,
        ).save(settings.state_dir)

        async def share_popularity() -> None:
            await _share_popularity(cluster, backend, settings.shards)

        async def watch_catalog() -> None:
            version = await catalog_store.version()
            if version != backend.catalog.catalog.version:
                log.info("catalog changed; reloading", extra={"version": version})
                backend.set_catalog(await asyncio.to_thread(Rendered, await catalog_store.read()))
                await asyncio.gather(
                    *(cluster.shard(s, "reload_catalog", timeout=30) for s in range(settings.shards)),
                    cluster.route("reload", timeout=30),
                    return_exceptions=True,
                )

        async def watch_stream() -> None:
            backend.stream_last_seq = await bus.last_seq(js, settings.stream)

        tasks += [
            asyncio.create_task(health.run(), name="health"),
            asyncio.create_task(_every(POPULARITY_PERIOD, "popularity", share_popularity)),
            asyncio.create_task(_every(CATALOG_PERIOD, "catalog", watch_catalog)),
            asyncio.create_task(_every(1.0, "stream", watch_stream)),
        ]
        while not health.all_ready and not stopping.is_set():
            await asyncio.sleep(0.05)
        log.info(
            "mabrec is ready",
            extra={
                "api": api_url,
                "shards": settings.shards,
                "seconds": round(time.monotonic() - began, 2),
                "dashboard": backend.dashboard_url,
            },
        )
        print(
            f"mabrec is up: API {api_url}  docs {api_url}/docs  Ray dashboard {backend.dashboard_url or 'off'}",
            file=sys.stderr,
            flush=True,
        )
        await stopping.wait()

        log.info("shutting down")
        server.should_exit = True
        await tasks[0]
        for task in tasks[1:]:
            task.cancel()
        await asyncio.gather(*tasks[1:], return_exceptions=True)
        await publisher.drain()
        with contextlib.suppress(ServiceError):
            await cluster.route("stop", timeout=10)
        results = await asyncio.gather(
            *(cluster.shard(s, "stop", timeout=60) for s in range(settings.shards)), return_exceptions=True
        )
        for shard, result in enumerate(results):
            if isinstance(result, BaseException):
                log.error("final checkpoint failed", extra={"shard": shard, "error": repr(result)})
        cluster.kill_all()
        await nc.drain()
        await pool.close()
        ray_api.disconnect()
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


async def _share_popularity(cluster: Any, backend: LiveBackend, shards: int) -> None:
    """Sum every shard's popularity counts and send the total back: all shards (and the API's
    fallback) rank with the whole population's evidence, not just their own users'."""
    results = await asyncio.gather(*(cluster.shard(s, "popularity") for s in range(shards)), return_exceptions=True)
    version = backend.catalog.catalog.version
    parts = [r for r in results if not isinstance(r, BaseException) and r[0] == version]
    if not parts:
        return
    clicks = np.sum([p[1] for p in parts], axis=0)
    seen = np.sum([p[2] for p in parts], axis=0)
    backend.set_popularity(clicks, seen)
    await asyncio.gather(
        *(cluster.shard(s, "set_popularity", version, clicks, seen) for s in range(shards)), return_exceptions=True
    )


async def _reshard_offline(cluster: Any, store: StateStore, old: Any, shards: int) -> Any:
    """A changed shard count at start: stop any running shards (final checkpoint), then assign
    the slots evenly. Users move with their slots; each slot keeps its checkpoint position."""
    from system.sharding import SlotMap

    log.info("re-sharding", extra={"from": old.shards, "to": shards})
    cluster.spawn(old.shards)  # attach to the old ones if they still run
    await asyncio.gather(*(cluster.shard(s, "stop", timeout=60) for s in range(old.shards)), return_exceptions=True)
    cluster.kill_all()
    new = SlotMap.even(shards)
    await store.assign_slots(new)
    return new


def _ray_env(settings: Settings) -> dict[str, str]:
    from system.embedded import ray_environment

    env = {"RAY_USAGE_STATS_ENABLED": "0"}
    if not settings.ray_address:  # our own local Ray: private, loopback-only, token-authenticated
        env.update(ray_environment(settings.state_dir))
    return env


# --- other commands ---------------------------------------------------------------------------


def _status(settings: Settings, as_json: bool) -> int:
    import httpx
    import orjson

    runtime = Runtime.load(settings.state_dir)
    if runtime is None or not pid_alive(runtime.supervisor_pid):
        print(f"mabrec is not running (no live supervisor in {settings.state_dir}/runtime.json)", file=sys.stderr)
        return 1
    try:
        status = httpx.get(f"{runtime.api_url}/api/status", timeout=5).json()
        ready = httpx.get(f"{runtime.api_url}/readyz", timeout=5).json()
    except httpx.HTTPError as exc:
        print(
            f"the supervisor (pid {runtime.supervisor_pid}) runs, but its API does not answer: {exc}", file=sys.stderr
        )
        return 1
    if as_json:
        print(orjson.dumps({"ready": ready, **status}, option=orjson.OPT_INDENT_2).decode())
        return 0 if ready.get("ready") else 2
    print(
        f"mabrec  {'READY' if ready.get('ready') else 'NOT READY'}   supervisor pid {runtime.supervisor_pid}   up {status['uptime']}s"
    )
    print(f"  api        {runtime.api_url}  (docs {runtime.api_url}/docs)")
    print(f"  dashboard  {runtime.dashboard_url or 'off'}")
    print(f"  postgres   {runtime.database_url}")
    print(f"  nats       {runtime.nats_url}   stream last seq {status['stream_last_seq']}")
    print(f"  ray        {runtime.ray_address}")
    print(f"  catalog    version {status['catalog']['version']}, {status['catalog']['movies']} movies")
    consumer = status["consumer"]
    print(
        f"  consumer   {'running' if consumer.get('running') else 'DOWN'}  position {consumer.get('position', 0)}"
        f"  events {consumer.get('events', 0)}  dead-lettered {sum((consumer.get('dead_letters') or {}).values())}"
    )
    publisher = status["publisher"]
    print(f"  publisher  published {publisher['published']}  pending {publisher['pending']}")
    print("  shard  ready  users    applied  covered  checkpointed  restarts")
    for s in status["shards"]:
        print(
            f"  {s['shard']:>5}  {'yes' if s.get('ready') else 'NO ':>5}  {s.get('users', 0):>6}  {s.get('events_applied', 0):>8}"
            f"  {s.get('covered_seq', 0):>7}  {s.get('checkpoint_seq', 0):>12}  {s.get('restarts', 0):>8}"
        )
    return 0 if ready.get("ready") else 2


def _database_settings(settings: Settings) -> tuple[Settings, Infrastructure | None]:
    """The running system's database (or DATABASE_URL); else an embedded one for this command."""
    if settings.database_url:
        return settings, None
    runtime = Runtime.load(settings.state_dir)
    if runtime is not None and pid_alive(runtime.supervisor_pid):
        return replace(settings, database_url=runtime.database_url), None
    infra = Infrastructure.start(replace(settings, nats_url="nats://unused"), with_ray=False)
    return infra.settings, infra


async def _catalog_load(settings: Settings, path: Path, merge: bool) -> int:
    settings, infra = await asyncio.to_thread(_database_settings, settings)
    try:
        await db.migrate(settings.database_url or "")
        pool = await db.open_pool(settings.database_url or "", name="catalog-load")
        try:
            result = await load_catalog_file(CatalogStore(pool), path, replace_all=not merge)
        finally:
            await pool.close()
    finally:
        if infra:
            await asyncio.to_thread(infra.stop)
    print(
        f"loaded {result.movies} movies from {path} (catalog version {result.version}, {result.facets} facet values"
        f"{f', {result.removed} movies removed' if result.removed else ''}); a running system reloads it within seconds"
    )
    return 0


def _bench(settings: Settings, args: argparse.Namespace) -> int:
    import orjson

    from bench import loadtest

    url = args.url
    if url is None:
        runtime = Runtime.load(settings.state_dir)
        if runtime is None or not pid_alive(runtime.supervisor_pid):
            print("mabrec bench: no running system here; start one (`mabrec up`) or pass --url", file=sys.stderr)
            return 2
        url = runtime.api_url
    if not url.startswith(("http://127.0.0.1", "http://localhost")):
        print("mabrec bench: load tests target 127.0.0.1 only", file=sys.stderr)
        return 2
    try:
        shares = dict(part.split("=") for part in args.mix.split(","))
        mix = loadtest.Mix(
            float(shares.get("recommend", 0)), float(shares.get("open", 0)), float(shares.get("list", 0))
        )
    except ValueError:
        print("mabrec bench: --mix looks like recommend=8,open=1,list=1", file=sys.stderr)
        return 2
    catalog_ids = [m.id for m in read_movies(DEFAULT_CATALOG)]
    config = {
        "url": url,
        "clients": args.clients,
        "duration": args.duration,
        "warmup": args.warmup,
        "users": args.users,
        "mix": args.mix,
    }
    print(
        f"load test: {args.clients} clients, {args.duration}s after {args.warmup}s warm-up, mix {args.mix}",
        file=sys.stderr,
    )
    results = asyncio.run(
        loadtest.run(
            url,
            clients=args.clients,
            duration=args.duration,
            warmup=args.warmup,
            users=args.users,
            mix=mix,
            movie_ids=catalog_ids,
        )
    )
    print(loadtest.table(results))
    if args.json:
        args.json.write_text(loadtest.report(results, config))
    else:
        print(orjson.dumps({"settings": config, "results": [r.as_dict() for r in results.values()]}).decode())
    return 1 if any(r.errors for r in results.values()) else 0


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

    p_bench = sub.add_parser("bench", help="load-test a running system (closed loop, keep-alive, latency percentiles)")
    p_bench.add_argument("--url", help="API base URL (default: the system started from this directory)")
    p_bench.add_argument("--clients", type=int, default=32, help="concurrent connections (default 32)")
    p_bench.add_argument("--duration", type=float, default=10.0, help="measured seconds (default 10)")
    p_bench.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first (default 2)")
    p_bench.add_argument("--users", type=int, default=100_000, help="distinct users, drawn Zipf(1.1) (default 100000)")
    p_bench.add_argument("--mix", default="recommend=1", help="request shares, e.g. recommend=8,open=1,list=1")
    p_bench.add_argument("--json", type=Path, help="write the JSON report here")
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
            return _status(settings, args.json)
        if args.command == "bench":
            return _bench(settings, args)
        if args.command == "catalog" and args.catalog_command == "load":
            if not args.file.exists():
                print(f"mabrec: no such file: {args.file}", file=sys.stderr)
                return 2
            return asyncio.run(_catalog_load(settings, args.file, args.merge))
    except ServiceError as exc:
        print(f"mabrec: {exc.detail}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
