"""`mabrec bench ...`: each benchmark against the running system, or the whole report."""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any
from urllib.parse import urlsplit

import orjson
import uvloop

from bench import cpu, durability, floor, ingest, loadtest, memory, policy, probes, report, wrk
from system.core.catalog_file import SHIPPED, read_movies
from system.core.errors import BadRequest
from system.core.settings import Settings
from system.local.runtime import Runtime


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


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def run(settings: Settings, args: argparse.Namespace) -> int:
    """`mabrec bench ...`: one benchmark against the running system, or the whole report."""
    ids = [m.id for m in read_movies(SHIPPED)]
    what = args.bench_command
    if what == "report":
        # A stop (SIGTERM) unwinds like Ctrl-C: each system the report started is stopped, its
        # servers with it, and its state directory removed, instead of being left running.
        signal.signal(signal.SIGTERM, _exit_on_signal)
        bar = _bar("benchmarks")
        results = report.run(args.shards, not args.no_dashboard, args.quick, args.also_shards, step=bar.set_description)
        bar.close()
        report.write(results, args.output)
        print(report.markdown(results))
        print(f"wrote {args.output} and {args.output.with_suffix('.json')}", file=sys.stderr)
        return 0
    if what == "policy":
        out: Any = policy.run()
    elif what == "floor":
        out = floor.measure(seconds=args.duration, warmup=3.0, movie_ids=ids, with_wrk=wrk.available())
    elif what == "durability":
        runs = uvloop.run(durability.run_all(seconds=args.duration))
        print("\n".join(durability.markdown(runs)))
        return 0
    elif what == "memory":
        out = memory.run(users=args.users, movies=args.movies, shards=args.shards)
    elif what == "growth":
        runtime = Runtime.load(settings.state_dir)
        if runtime is None:
            raise BadRequest("no running system here: start one with `mabrec up`")
        _api_url(settings, runtime.api_url)  # loopback only
        out = report.run_growth(runtime, args.users, ids, lambda step: print(step, file=sys.stderr))
    elif what == "cpu":
        runtime = Runtime.load(settings.state_dir)
        if runtime is None:
            raise BadRequest("no running system here: start one with `mabrec up`")
        out = uvloop.run(
            cpu.both(runtime, rate=args.rate, duration=args.duration, rows=args.history_rows, movie_ids=ids)
        )
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
