"""A closed-loop HTTP load generator for a running mabrec (`mabrec bench`).

N concurrent clients, each on its own keep-alive connection, send requests back to back for a
fixed duration after a warm-up. The mix draws users from a Zipf distribution: recommendations,
movie opens that are clicks, and catalog pages. Latencies go into a log-spaced histogram, so the
percentiles are read from all requests, not averaged. The client speaks plain HTTP/1.1 over
asyncio streams: a general-purpose client would cost more CPU than the server it measures.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import numpy as np

# Histogram: 1 us .. 100 s, 50 buckets per decade.
_EDGES = np.logspace(-6, 2, 8 * 50 + 1)


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
            **{f"p{q}_ms": round(self.histogram.percentile(q) * 1e3, 3) for q in (50, 90, 99, 99.9)},
        }


class Connection:
    """One keep-alive HTTP/1.1 connection; GET only; reads Content-Length bodies."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def get(self, path: str, headers: dict[str, str]) -> int:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\n{extra}\r\n".encode())
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        await self.reader.readexactly(length)
        return status

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
    """Shares of request kinds (normalized)."""

    recommend: float = 1.0
    open_movie: float = 0.0
    list_page: float = 0.0


async def run(
    url: str,
    *,
    clients: int = 32,
    duration: float = 10.0,
    warmup: float = 2.0,
    users: int = 100_000,
    zipf: float = 1.1,
    limit: int = 10,
    mix: Mix = Mix(),
    movie_ids: list[int] | None = None,
    seed: int = 0,
) -> dict[str, Result]:
    """Closed loop: `clients` connections, each sending its next request when the last returns."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    kinds = np.array([mix.recommend, mix.open_movie, mix.list_page], dtype=np.float64)
    kinds /= kinds.sum()
    movie_ids = movie_ids or list(range(1, 1001))
    histograms = {name: Histogram() for name in ("recommend", "open_movie", "list_page")}
    counts = {name: [0, 0] for name in histograms}  # requests, errors (measured phase only)
    began = time.perf_counter()
    measure_from = began + warmup
    stop_at = measure_from + duration

    async def client(index: int) -> None:
        conn = Connection(host, port)
        local = np.random.default_rng(seed * 1000 + index)
        try:
            while time.perf_counter() < stop_at:
                user = f"bench-{(local.zipf(zipf) - 1) % users}"
                kind = ("recommend", "open_movie", "list_page")[int(local.choice(3, p=kinds))]
                if kind == "recommend":
                    path, headers = f"/api/recommendations/movies?limit={limit}", {"uxid": user}
                elif kind == "open_movie":
                    path, headers = f"/api/movies/{movie_ids[int(local.integers(len(movie_ids)))]}", {"uxid": user}
                else:
                    path, headers = f"/api/movies?page={int(local.integers(1, 50))}&per_page=20", {}
                t0 = time.perf_counter()
                try:
                    ok = (await conn.get(path, headers)) < 400
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    ok = False
                    await conn.close()
                t1 = time.perf_counter()
                if t0 >= measure_from and t1 <= stop_at:
                    counts[kind][0] += 1
                    counts[kind][1] += 0 if ok else 1
                    histograms[kind].add(t1 - t0)
        finally:
            await conn.close()

    await asyncio.gather(*(client(i) for i in range(clients)))
    return {
        name: Result(name, counts[name][0], counts[name][1], duration, histograms[name])
        for name in histograms
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
