"""The `mabrec` commands other than `up`: status, catalog load, bench. None of them needs Ray."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from system import db
from system.catalog import read_movies
from system.embedded import Runtime, pid_alive
from system.errors import BadRequest
from system.infra import Infrastructure
from system.settings import Settings
from system.store import CatalogStore

log = logging.getLogger(__name__)

DEFAULT_CATALOG = Path(__file__).resolve().parent.parent / "data" / "catalog.csv.gz"


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


def status(settings: Settings, as_json: bool) -> int:
    import httpx
    import orjson

    runtime = Runtime.load(settings.state_dir)
    if runtime is None:
        print(f"mabrec is not running here (no {settings.state_dir}/runtime.json)", file=sys.stderr)
        return 1
    supervisor = "running" if pid_alive(runtime.supervisor_pid) else "DOWN (the API and actors go on without it)"
    try:
        status = httpx.get(f"{runtime.api_url}/api/status", timeout=5).json()
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


def database_settings(settings: Settings) -> tuple[Settings, Infrastructure | None]:
    """The running system's database (or DATABASE_URL); else an embedded one for this command."""
    if settings.database_url:
        return settings, None
    runtime = Runtime.load(settings.state_dir)
    if runtime is not None and pid_alive(runtime.supervisor_pid):
        return replace(settings, database_url=runtime.database_url), None
    infra = Infrastructure.start(replace(settings, nats_url="nats://unused"), with_ray=False)
    return infra.settings, infra


async def catalog_load(settings: Settings, path: Path, merge: bool) -> int:
    settings, infra = await asyncio.to_thread(database_settings, settings)
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


def _api_url(settings: Settings, url: str | None) -> str:
    if url is None:
        runtime = Runtime.load(settings.state_dir)
        if runtime is None:
            raise BadRequest("no running system here: start one (`mabrec up`) or pass --url")
        url = runtime.api_url
    if urlsplit(url).hostname not in ("127.0.0.1", "localhost"):
        raise BadRequest("load tests target 127.0.0.1 only")
    return url


def _bar(desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=100, desc=desc, unit="%", disable=not sys.stderr.isatty(), leave=False)


def bench(settings: Settings, args: argparse.Namespace) -> int:
    """`mabrec bench ...`: one benchmark against the running system, or the whole report."""
    import orjson
    import uvloop

    from bench import ingest, loadtest, memory, policy, probes, report

    ids = [m.id for m in read_movies(DEFAULT_CATALOG)]
    what = args.bench_command
    if what == "report":
        bar = _bar("benchmarks")
        results = report.run(args.shards, not args.no_dashboard, args.quick, args.also_shards, step=bar.set_description)
        bar.close()
        report.write(results, args.output)
        print(report.markdown(results))
        print(f"wrote {args.output} and {args.output.with_suffix('.json')}", file=sys.stderr)
        return 0
    if what == "policy":
        out: Any = policy.run()
    elif what == "memory":
        out = memory.run(users=args.users, movies=args.movies, shards=args.shards)
    elif what == "click":
        out = uvloop.run(
            probes.click_to_state(
                _api_url(settings, args.url), probes=args.probes, background_rate=args.rate, movie_ids=ids
            )
        )
    elif what == "ingest":
        runtime = Runtime.load(settings.state_dir)
        if runtime is None:
            raise BadRequest("no running system here: start one with `mabrec up`")
        out = uvloop.run(
            ingest.run(
                _api_url(settings, args.url),
                runtime.nats_url,
                f"{runtime.namespace}.events",
                rate=args.rate,
                duration=args.duration,
                per_message=args.per_message,
                movie_ids=ids,
            )
        )
    else:  # http
        url = _api_url(settings, args.url)
        mix = loadtest.Mix.parse(args.mix)
        mode = f"open loop at {args.rate:g} req/s" if args.rate else f"closed loop, {args.clients} clients"
        print(
            f"load test: {mode}, {args.duration:g} s after {args.warmup:g} s warm-up, mix {args.mix}", file=sys.stderr
        )
        results = uvloop.run(
            loadtest.run(
                url,
                clients=args.clients,
                rate=args.rate,
                duration=args.duration,
                warmup=args.warmup,
                users=args.users,
                mix=mix,
                movie_ids=ids,
            )
        )
        print(loadtest.table(results))
        config = {"url": url, "clients": args.clients, "rate": args.rate, "duration": args.duration, "mix": args.mix}
        if args.json:
            args.json.write_text(loadtest.report(results, config))
        return 1 if any(r.errors for r in results.values()) else 0
    print(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode())
    return 0
