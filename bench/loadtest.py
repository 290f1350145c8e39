"""The HTTP load generator of `mabrec bench http`.

Two modes. Closed loop: N clients, each on its own keep-alive connection, send their next request
when the last one returns (throughput at a concurrency). Open loop: requests start at a fixed
rate whatever the answers (latency at a load); a request's latency counts from when it was due,
not from when a connection was free, so a slow server cannot hide its queueing (no coordinated
omission).

The mix is a browsing session: users drawn from a Zipf distribution ask for a slate, open
(click) one of the movies it showed, or page through the catalog. Latencies go into a histogram
with 50 log-spaced buckets per decade; percentiles are read from all requests, not averaged.
The client speaks plain HTTP/1.1 over asyncio streams: a general-purpose client would cost more
CPU than the server it measures, on the same two cores.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import numpy as np
import orjson

_EDGES = np.logspace(-6, 2, 8 * 50 + 1)  # 1 us .. 100 s
KINDS = ("recommend", "open_movie", "list_page")


@dataclass
class Histogram:
    counts: np.ndarray = field(default_factory=lambda: np.zeros(len(_EDGES) + 1, dtype=np.int64))

    def add(self, seconds: float) -> None:
        self.counts[np.searchsorted(_EDGES, seconds)] += 1

    def percentile(self, q: float) -> float:
        total = int(self.counts.sum())
        if total == 0:
            return float("nan")
        rank = int(np.searchsorted(np.cumsum(self.counts), q / 100 * total))
        return float(_EDGES[min(rank, len(_EDGES) - 1)])


def percentiles_from_buckets(edges: list[float], counts: list[int], qs: tuple[float, ...]) -> dict[str, float]:
    """Percentiles (upper bucket edges) of a cumulative-free bucket histogram."""
    total = sum(counts)
    out = {}
    cum = np.cumsum(counts)
    for q in qs:
        rank = int(np.searchsorted(cum, q / 100 * total)) if total else 0
        out[f"p{q:g}"] = edges[min(rank, len(edges) - 1)] if total else float("nan")
    return out


@dataclass
class Result:
    name: str
    requests: int
    errors: int
    seconds: float
    histogram: Histogram

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict[str, float | int | str]:
        return {
            "name": self.name,
            "requests": self.requests,
            "errors": self.errors,
            "seconds": round(self.seconds, 2),
            "rate_per_s": round(self.rate, 1),
            **{f"p{q:g}_ms": round(self.histogram.percentile(q) * 1e3, 3) for q in (50, 90, 99, 99.9)},
        }


class Connection:
    """One keep-alive HTTP/1.1 connection; GET only; reads Content-Length bodies."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def get(self, path: str, headers: dict[str, str]) -> tuple[int, bytes, str]:
        """(status, body, the X-Recommendation-Id header or "")"""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\n{extra}\r\n".encode())
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length, rid = 0, ""
        for line in head.split(b"\r\n"):
            name = line[:20].lower()
            if name.startswith(b"content-length:"):
                length = int(line[15:])
            elif name == b"x-recommendation-id:":
                rid = line[20:].strip().decode()
        return status, await self.reader.readexactly(length), rid

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except OSError:
                pass
            self.writer = None


@dataclass(frozen=True)
class Mix:
    """Shares of request kinds (normalized): a slate, a movie opened from the user's last slate
    (a click, or a random movie if the user has none yet), a catalog page."""

    recommend: float = 1.0
    open_movie: float = 0.0
    list_page: float = 0.0

    @classmethod
    def parse(cls, text: str) -> Mix:
        """From `recommend=8,open=1,list=1`."""
        shares = {k.strip(): float(v) for k, v in (part.split("=") for part in text.split(","))}
        unknown = set(shares) - {"recommend", "open", "list"}
        if unknown or not sum(shares.values()) > 0:
            raise ValueError(f"a mix looks like recommend=8,open=1,list=1, got {text!r}")
        return cls(shares.get("recommend", 0.0), shares.get("open", 0.0), shares.get("list", 0.0))


class Session:
    """Chooses the next request: a Zipf user and a kind from the mix; remembers slates for clicks."""

    def __init__(
        self,
        mix: Mix,
        users: int,
        zipf: float | None,
        limit: int,
        movie_ids: list[int],
        seed: int,
        prefix: str = "bench-",
    ) -> None:
        shares = np.array([mix.recommend, mix.open_movie, mix.list_page], dtype=np.float64)
        self.cdf = np.cumsum(shares / shares.sum())
        self.users, self.zipf, self.limit, self.movie_ids, self.prefix = users, zipf, limit, movie_ids, prefix
        self.rng = np.random.default_rng(seed)
        self.last_slate: dict[str, tuple[str, list[int]]] = {}

    def next(self) -> tuple[str, str, dict[str, str], str]:
        """(kind, path, headers, user)"""
        n = int(self.rng.integers(self.users)) if self.zipf is None else int(self.rng.zipf(self.zipf)) - 1
        user = f"{self.prefix}{n % self.users}"
        kind = KINDS[int(np.searchsorted(self.cdf, self.rng.random()))]
        if kind == "recommend":
            return kind, f"/api/recommendations/movies?limit={self.limit}", {"uxid": user}, user
        if kind == "open_movie":
            rid, slate = self.last_slate.get(user, ("", []))
            if slate:
                movie = slate[int(self.rng.integers(len(slate)))]
                return kind, f"/api/movies/{movie}", {"uxid": user, "X-Recommendation-Id": rid}, user
            return (
                kind,
                f"/api/movies/{self.movie_ids[int(self.rng.integers(len(self.movie_ids)))]}",
                {"uxid": user},
                user,
            )
        return kind, f"/api/movies?page={int(self.rng.integers(1, 50))}&per_page=20", {}, user

    def saw(self, user: str, body: bytes, rid: str) -> None:
        try:
            self.last_slate[user] = (rid, [m["id"] for m in orjson.loads(body)])
        except (orjson.JSONDecodeError, TypeError, KeyError):
            pass


async def run(
    url: str,
    *,
    clients: int = 32,
    rate: float | None = None,
    duration: float = 10.0,
    warmup: float = 2.0,
    users: int = 100_000,
    zipf: float | None = 1.1,
    prefix: str = "bench-",
    limit: int = 10,
    mix: Mix = Mix(),
    movie_ids: list[int] | None = None,
    seed: int = 0,
    progress: Callable[[float], None] | None = None,
) -> dict[str, Result]:
    """Closed loop with `clients` connections, or, with `rate`, open loop at that many requests
    per second over up to `clients` connections. Users `<prefix>N`, N drawn Zipf(`zipf`) or,
    with `zipf` None, uniformly from `users`."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    session = Session(mix, users, zipf, limit, movie_ids or list(range(1, 1001)), seed, prefix)
    histograms = {name: Histogram() for name in KINDS}
    counts = {name: [0, 0] for name in KINDS}  # requests, errors (measured phase only)
    began = time.perf_counter()
    measure_from = began + warmup
    stop_at = measure_from + duration
    free: asyncio.Queue[Connection] = asyncio.Queue()
    for _ in range(clients):
        free.put_nowait(Connection(host, port))

    async def one(due: float) -> None:
        kind, path, headers, user = session.next()
        conn = await free.get()
        try:
            status, body, rid = await conn.get(path, headers)
            ok = status < 400
            if kind == "recommend" and ok and mix.open_movie:
                session.saw(user, body, rid)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            ok = False
            await conn.close()
        finally:
            free.put_nowait(conn)
        done = time.perf_counter()
        if due >= measure_from and done <= stop_at:
            counts[kind][0] += 1
            counts[kind][1] += 0 if ok else 1
            histograms[kind].add(done - due)

    async def closed_client() -> None:
        while time.perf_counter() < stop_at:
            await one(time.perf_counter())

    async def open_loop() -> None:
        assert rate is not None
        tasks: set[asyncio.Task[None]] = set()
        n = 0
        while (due := began + n / rate) < stop_at:
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one(due))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            n += 1
        if tasks:
            await asyncio.wait(tasks, timeout=30)

    async def report_progress() -> None:
        while (now := time.perf_counter()) < stop_at:
            if progress:
                progress(min(1.0, (now - began) / (stop_at - began)))
            await asyncio.sleep(0.5)

    ticker = asyncio.create_task(report_progress())
    if rate is None:
        await asyncio.gather(*(closed_client() for _ in range(clients)))
    else:
        await open_loop()
    ticker.cancel()
    while not free.empty():
        await free.get_nowait().close()
    return {
        name: Result(name, counts[name][0], counts[name][1], duration, histograms[name])
        for name in KINDS
        if counts[name][0]
    }


def table(results: dict[str, Result]) -> str:
    rows = [
        f"{'request':<12}{'count':>9}{'errors':>8}{'req/s':>10}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'p99.9 ms':>10}"
    ]
    for r in results.values():
        d = r.as_dict()
        rows.append(
            f"{r.name:<12}{r.requests:>9}{r.errors:>8}{r.rate:>10.1f}{d['p50_ms']:>9}{d['p90_ms']:>9}{d['p99_ms']:>9}{d['p99.9_ms']:>10}"
        )
    return "\n".join(rows)


def report(results: dict[str, Result], settings: dict[str, object]) -> str:
    return json.dumps({"settings": settings, "results": [r.as_dict() for r in results.values()]}, indent=2)
