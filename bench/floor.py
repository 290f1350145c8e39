"""The floor for a slate: mabrec's own new-user slate code in one bare Starlette+uvicorn
process, with no state kept, no events and no other process. Whatever the system spends above
it per slate is the price of its design (routing, learning, durability), so the report shows
the system's figures as ratios to the floor's, measured in the same run: ratios hold on any
machine, where milliseconds do not.

`python -m bench.floor --port P` serves it (`serve` starts it so); the route is the system's:
GET /api/recommendations/movies with a `uxid` header and `limit`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import numpy as np
import psutil
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from api.errors import HANDLERS
from api.params import LIMIT
from api.render import Rendered
from system.core.catalog import Catalog
from system.core.catalog_file import SHIPPED, read_movies
from system.core.errors import BadRequest
from system.core.inputs import user_id_header
from system.core.shard_state import ShardState
from system.local.processes import free_port, stop_pid

LOOPBACK = "127.0.0.1"


def app(catalog: Catalog) -> Starlette:
    """The slate route over the same code the system runs for a new user: the header and query
    rules, the shard's draw (ShardState.slate keeps no user it does not have), the rendering."""
    state = ShardState(catalog, rng=np.random.default_rng())
    rendered = Rendered(catalog)

    async def slate(request: Request) -> Response:
        uxid = request.headers.get("uxid")
        if uxid is None:
            raise BadRequest("the uxid header is required")
        ids, reasons = state.slate(user_id_header(uxid), LIMIT.read(request))
        return Response(rendered.by_ids(ids, reasons), media_type="application/json")

    floor = Starlette(routes=[Route("/api/recommendations/movies", slate)], exception_handlers=HANDLERS)
    floor.state.shard = state
    return floor


@contextmanager
def serve() -> Iterator[tuple[str, int]]:
    """The floor in a process of its own on 127.0.0.1: (its URL, its pid) until the block ends."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.floor", "--port", str(port)],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        stdout=subprocess.DEVNULL,
    )
    url = f"http://{LOOPBACK}:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/api/recommendations/movies", headers={"uxid": "up"}, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass  # not listening yet
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the floor did not start (exit code {proc.poll()})")
            time.sleep(0.1)
        yield url, proc.pid
    finally:
        stop_pid(proc.pid)


def measure(*, seconds: float, warmup: float, movie_ids: list[int], with_wrk: bool) -> dict[str, Any]:
    """The floor at a steady 1,000 slates/s (CPU per slate, latency) and closed loop (slates/s)."""
    from bench import loadtest, wrk  # the load generators, only when measuring

    out: dict[str, Any] = {}
    with serve() as (url, pid):
        proc = psutil.Process(pid)

        async def paced() -> dict[str, Any]:
            load = asyncio.create_task(
                loadtest.run(url, clients=64, rate=1000, duration=seconds, warmup=warmup, users=2_000_000,
                             zipf=None, prefix="floor-", movie_ids=movie_ids)
            )  # fmt: skip
            await asyncio.sleep(warmup)
            before = sum(proc.cpu_times()[:2])
            await asyncio.sleep(seconds)
            spent = sum(proc.cpu_times()[:2]) - before
            result = (await load)["recommend"]
            return {**result.as_dict(), "cpu_ms_per_slate": round(1000 * spent / max(result.requests, 1), 4)}

        out["paced"] = asyncio.run(paced())
        if with_wrk:
            before = sum(proc.cpu_times()[:2])
            closed = wrk.run(url, seconds=seconds)
            closed["cpu_ms_per_slate"] = round(1000 * (sum(proc.cpu_times()[:2]) - before) / closed["requests"], 4)
            out["closed_loop_wrk"] = closed
        closed_py = asyncio.run(
            loadtest.run(url, clients=64, duration=seconds, warmup=warmup, movie_ids=movie_ids, prefix="floorc-")
        )
        out["closed_loop"] = closed_py["recommend"].as_dict()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve the floor: mabrec's new-user slate in one bare process.")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    import uvicorn

    floor = app(Catalog.from_movies(list(read_movies(SHIPPED))))
    uvicorn.run(floor, host=LOOPBACK, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
