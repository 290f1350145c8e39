"""The `mabrec` command: the parser and the dispatch. Each command is a function in the module
of what it operates on (supervisor.up, system.status.show, bench.commands.run, ...); the few
lines that join two of them (verify: Ray exports and the recount) are here."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from sim import POLICIES
from system.core.errors import ServiceError
from system.core.limits import MAX_SHARDS
from system.core.settings import Settings
from system.logs import setup_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mabrec",
        description="Real-time movie recommendations with Thompson-sampling bandits on Ray, NATS JetStream and PostgreSQL.",
        epilog="Configuration comes from the environment (DATABASE_URL, NATS_URL, RAY_ADDRESS, MABREC_*); see the README.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p_up = sub.add_parser(
        "up", help="run everything: embedded servers as needed, Ray shards, the event router, the API"
    )
    p_up.add_argument(
        "--shards", type=int, help="number of shard actors (MABREC_SHARDS; default: as left, else one per CPU)"
    )
    p_up.add_argument("--host", help="API bind address (MABREC_HOST, default 127.0.0.1)")
    p_up.add_argument("--port", type=int, help="API port (MABREC_PORT, default 8000; 0 picks a free one)")
    p_up.add_argument("--no-dashboard", action="store_true", help="do not start the Ray dashboard (local Ray only)")

    p_status = sub.add_parser("status", help="show the running system (started by `mabrec up` from this directory)")
    p_status.add_argument("--json", action="store_true", help="print JSON")

    p_scale = sub.add_parser(
        "scale", help="change the number of shards of the running system, live (slots move, users with them)"
    )
    scale_what = p_scale.add_mutually_exclusive_group(required=True)
    scale_what.add_argument("--shards", type=int, help=f"how many shard actors (1 to {MAX_SHARDS})")
    scale_what.add_argument(
        "--cancel", action="store_true", help="give up a change under way or failing: keep the slot map's layout"
    )
    p_scale.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for it (default 300)")

    p_restart = sub.add_parser("restart", help="replace the shard actors of the running system")
    p_restart.add_argument(
        "--rolling", action="store_true", required=True, help="one at a time, its slots served by the others meanwhile"
    )
    p_restart.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for it (default 600)")

    p_user = sub.add_parser("user", help="user commands (admin)")
    user_sub = p_user.add_subparsers(dest="user_command", required=True, metavar="ACTION")
    p_erase = user_sub.add_parser(
        "erase", help="erase a user: state from memory and PostgreSQL, their events from the event log"
    )
    p_erase.add_argument("uxid", help="the user's id (the uxid header)")
    p_erase.add_argument("--no-wait", action="store_true", help="do not wait for the event log's scrub")
    p_erase.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the scrub (default 300)")

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

    p_nats = sub.add_parser(
        "nats-config",
        help="print the nats-server configuration: mabrec's users, their rights, JetStream's disk sync",
        description="The users and rights of system/core/access.py for MABREC_NAMESPACE, each password "
        "taken by the server from its environment (MABREC_NATS_PASSWORD, NATS_API_PASSWORD, NATS_SHARD_PASSWORD, "
        "NATS_ROUTER_PASSWORD, NATS_PRODUCER_PASSWORD). docker-compose.yml writes it for its NATS this way.",
    )
    p_nats.add_argument("--output", type=Path, help="write it to this file (default: standard output)")

    sub.add_parser(
        "prometheus-config",
        help="print a Prometheus configuration that scrapes the system started from this directory"
        " (its API's /metrics and Ray's metrics export)",
    )

    p_sim = sub.add_parser(
        "simulate", help="compare the policy with baselines on synthetic users (see docs/simulation)"
    )
    p_sim.add_argument("--policies", default=",".join(POLICIES))
    p_sim.add_argument("--seeds", type=int, default=5, help="independent worlds (default 5)")
    p_sim.add_argument("--seed", type=int, default=0, help="the first seed: the same seeds give the same numbers")
    p_sim.add_argument("--users", type=int, default=1000)
    p_sim.add_argument("--rounds", type=int, default=200)
    p_sim.add_argument("--shift-at", type=int, help="re-draw every user's genre tastes at this round")
    p_sim.add_argument(
        "--output", type=Path, default=Path("docs/simulation"), help="report, table and plots (default docs/simulation)"
    )
    p_sim.add_argument("--url", help="drive a running service over HTTP instead (mabrec's policy only)")
    p_sim.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KNOB=VALUE",
        help="run mabrec's policy with this PolicyConfig value instead of its default (repeatable),"
        " e.g. --set taste_spread=1",
    )

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
    p_floor = bench_sub.add_parser(
        "floor", help="the floor: the new-user slate code in one bare Starlette+uvicorn process, no system"
    )
    p_floor.add_argument("--duration", type=float, default=15.0, help="measured seconds per load (default 15)")
    p_durability = bench_sub.add_parser(
        "durability", help="JetStream ingestion with each disk sync (always, 1 s, NATS's default), own servers"
    )
    p_durability.add_argument("--duration", type=float, default=5.0, help="seconds per measure (default 5)")
    p_cpu = bench_sub.add_parser(
        "cpu", help="CPU per slate of every process (shards, API, router, NATS, PostgreSQL, ...) at a steady rate"
    )
    p_cpu.add_argument("--rate", type=float, default=1000, help="slates per second (default 1000)")
    p_cpu.add_argument("--duration", type=float, default=15.0, help="measured seconds (default 15)")
    p_cpu.add_argument(
        "--history-rows", type=int, default=300, help="state rows of the users with history (default 300; 0: skip)"
    )
    p_growth = bench_sub.add_parser(
        "growth", help="users touched once, by the million: the shards' memory, and slates for users evicted"
    )
    p_growth.add_argument("--users", type=int, default=2_000_000, help="distinct users (default 2000000)")
    p_report = bench_sub.add_parser("report", help="start a fresh system, run every benchmark, write BENCHMARKS.md")
    p_report.add_argument(
        "--shards", type=int, help="shards of the system measured (default: as `mabrec up`, one per CPU)"
    )
    p_report.add_argument(
        "--also-shards", type=int, nargs="*", default=[], help="closed-loop runs with these shard counts too"
    )
    p_report.add_argument("--no-dashboard", action="store_true")
    p_report.add_argument("--quick", action="store_true", help="short runs (a smoke test, not numbers to quote)")
    p_report.add_argument("--output", type=Path, default=Path("BENCHMARKS.md"))
    return parser


def up(settings: Settings, args: argparse.Namespace) -> int:
    import supervisor

    return asyncio.run(supervisor.up(settings))


def status(settings: Settings, args: argparse.Namespace) -> int:
    from system.status import show

    return show(settings, args.json)


def scale(settings: Settings, args: argparse.Namespace) -> int:
    from system.deployment import cancel, scale

    if args.cancel:
        return asyncio.run(cancel(settings))
    if not 1 <= args.shards <= MAX_SHARDS:
        print(f"mabrec scale: --shards must be between 1 and {MAX_SHARDS}", file=sys.stderr)
        return 2
    return asyncio.run(scale(settings, args.shards, args.timeout))


def restart(settings: Settings, args: argparse.Namespace) -> int:
    from system.deployment import rolling_restart

    return asyncio.run(rolling_restart(settings, args.timeout))


def user(settings: Settings, args: argparse.Namespace) -> int:
    from system.user_admin import erase

    return asyncio.run(erase(settings, args.uxid, not args.no_wait, args.timeout))


def catalog(settings: Settings, args: argparse.Namespace) -> int:
    if not args.file.exists():
        print(f"mabrec: no such file: {args.file}", file=sys.stderr)
        return 2
    return asyncio.run(_catalog_load(settings, args.file, merge=args.merge))


async def _catalog_load(settings: Settings, path: Path, *, merge: bool) -> int:
    from system.db.catalog_store import CatalogStore, load_file
    from system.db.migrations import migrate
    from system.db.pool import short_lived_pool
    from system.local.infra import Infrastructure

    settings, infra = await asyncio.to_thread(Infrastructure.for_database, settings)
    try:
        await migrate(settings.database_url or "")
        async with short_lived_pool(settings.database_url or "", "catalog-load") as pool:
            result = await load_file(CatalogStore(pool), path, replace=not merge)
    finally:
        if infra:
            await asyncio.to_thread(infra.stop)
    print(
        f"loaded {result.movies} movies from {path} (catalog version {result.version}, {result.facets} facet values"
        f"{f', {result.removed} movies removed' if result.removed else ''}); a running system reloads it within seconds"
    )
    return 0


def verify(settings: Settings, args: argparse.Namespace) -> int:
    """Recount against the system started from this directory (or the configured URLs)."""
    from system.local.runtime import Runtime
    from system.local.servers import ray_env

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
    os.environ.update(ray_env(replace(settings, ray_address=None) if local_ray else settings))
    return asyncio.run(_verify(settings, args.json, args.timeout))


async def _verify(settings: Settings, as_json: bool, timeout: float) -> int:
    from actors import ray_api
    from system.core.health import shard_key
    from system.db.pool import short_lived_pool
    from system.db.state_store import StateStore
    from system.verify import render
    from system.verify import verify as recount_and_compare

    ray_api.connect(settings, settings.ray_address or "")
    try:
        actors = ray_api.Actors(settings)
        async with short_lived_pool(settings.database_url or "", "verify") as pool:
            shards = (await StateStore(pool).slot_map()).shards
        report = await recount_and_compare(
            settings, lambda shard: actors.call(shard_key(shard), "export", timeout=60), shards, timeout
        )
    finally:
        ray_api.disconnect()
    print(render(report, as_json))
    return 0 if report.ok else 1


def nats_config(settings: Settings, args: argparse.Namespace) -> int:
    from system.core import access

    unreadable = access.unreadable_passwords(os.environ)
    if unreadable:  # the server would refuse to start, with a parse error about a digit
        print(
            f"mabrec nats-config: {', '.join(unreadable)}: nats-server reads these from its environment as"
            " configuration values, so a password must start with a letter and hold only letters, digits, '_'"
            " and '-' (not true/false/yes/no/on/off); e.g. python3 -c 'import secrets;"
            ' print("p" + secrets.token_urlsafe(32))\'',
            file=sys.stderr,
        )
        return 2
    text = access.server_config(settings, access.variable)
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.write_text(text)
    return 0


def prometheus_config(settings: Settings, args: argparse.Namespace) -> int:
    from system.status import prometheus_config

    text = prometheus_config(settings)
    if text is None:
        print(f"mabrec is not running here (no {settings.state_dir}/runtime.json)", file=sys.stderr)
        return 1
    sys.stdout.write(text)
    return 0


def simulate(settings: Settings, args: argparse.Namespace) -> int:
    from sim.command import simulate

    return simulate(args)


def bench(settings: Settings, args: argparse.Namespace) -> int:
    from bench.commands import run

    return run(settings, args)


COMMANDS: dict[str, Callable[[Settings, argparse.Namespace], int]] = {
    "up": up,
    "status": status,
    "scale": scale,
    "restart": restart,
    "user": user,
    "catalog": catalog,
    "verify": verify,
    "nats-config": nats_config,
    "prometheus-config": prometheus_config,
    "simulate": simulate,
    "bench": bench,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        flags: dict[str, Any] = {}
        if args.command == "up":
            flags = {
                "shards": args.shards,
                "host": args.host,
                "port": args.port,
                "dashboard": False if args.no_dashboard else None,
            }
        settings = Settings.from_env(**flags)
    except ServiceError as exc:
        print(f"mabrec: configuration error: {exc.detail}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level, "supervisor" if args.command == "up" else args.command)
    try:
        code = COMMANDS[args.command](settings, args)
        sys.stdout.flush()  # here, where a closed pipe can be handled
        return code
    except ServiceError as exc:
        print(f"mabrec: {exc.detail}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `mabrec status | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
        return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
