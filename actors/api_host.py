"""The HTTP API's host, as a plain class: Ray wraps it in actors/ray_api.py.

The API runs inside detached actors rather than in the supervisor, so it keeps answering while
the supervisor is down (crashed, restarting, being upgraded); several API actors can share the
port (SO_REUSEPORT, MABREC_API_WORKERS > 1) to use more cores. Each owns its NATS publisher
and its view of the catalog; the supervisor pushes it the health of the shards, the global
popularity and catalog reloads.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import uvicorn
import uvloop
from nats.errors import Error as NatsError

from actors.live_backend import FailoverGateway, Gateway, LiveBackend, Serving
from api.app import create_app
from api.http_limits import BoundedHttpTools
from api.metrics import ApiMetrics
from api.render import Rendered
from system.bus import stream
from system.bus.dataplane import ShardClient
from system.bus.publisher import Publisher
from system.core import access
from system.core.errors import Unavailable
from system.core.popularity import Popularity
from system.core.settings import Settings
from system.core.sharding import SlotMap
from system.db.catalog_store import CatalogStore
from system.db.pool import short_lived_pool
from system.db.state_store import StateStore
from system.tasks import Background

log = logging.getLogger(__name__)


class ApiHost:
    """Serves HTTP on a thread of its own with a uvloop event loop: faster than the actor's
    loop, and Ray's calls into the actor (health pushes, reloads) never queue behind requests.

    One writer: the HTTP loop owns the backend. Ray's calls (on the actor's own thread) build
    what changes there (a catalog rendered, a model under new popularity: costly, off the request
    path) and hand the result to the HTTP loop (`call_soon_threadsafe`), which swaps it in between
    two requests. The updates are built one at a time from the host's own copy of the inputs, so
    a popularity push and a catalog reload never undo each other."""

    def __init__(self, settings: Settings, index: int, port: int, gateway: Gateway) -> None:
        # Cheap and I/O-free: Ray re-runs this on a restart; `ensure_serving` does the work.
        self.settings = settings
        self.index = index
        self.port = port
        self.gateway = gateway
        self.backend: LiveBackend | None = None
        self.api_metrics: ApiMetrics | None = None  # the app's counters (the current HTTP server's)
        self._server: uvicorn.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._starting = Background(self._start, f"api-{index} start", forever=False)
        self.latest: Serving | None = None  # the catalog and model last handed to the HTTP loop
        self._updating = asyncio.Lock()

    def __repr__(self) -> str:  # what Ray shows: the dashboard's Repr column, log line prefixes
        return f"ApiHost({self.index}, http://{self.settings.host}:{self.port})"

    @property
    def serving(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and bool(self._server and self._server.started)

    async def ensure_serving(self) -> dict[str, Any]:
        """Start serving unless serving or starting (idempotent, never waits). Returns `status()`."""
        if not self.serving:
            self._starting.ensure()
        return self.status()

    async def _start(self) -> None:
        settings = self.settings
        async with short_lived_pool(settings.database_url or "", f"api-{self.index}") as pool:
            catalog = await CatalogStore(pool).read()
            slot_map = await StateStore(pool).slot_map()
            popularity = await StateStore(pool).popularity()  # the fallback's ranking, until the first push
        async with self._updating:
            serving = self.latest = await asyncio.to_thread(
                Serving.build, Rendered(catalog), popularity, settings.policy()
            )
        started: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._run_http,
            args=(serving, slot_map, started),
            name=f"http-{self.index}",
            daemon=True,
        )
        self._thread.start()
        await asyncio.wrap_future(started)
        log.info(
            "api serving", extra={"host": settings.host, "port": self.port, "index": self.index, "pid": os.getpid()}
        )

    def _run_http(self, serving: Serving, slot_map: SlotMap, started: concurrent.futures.Future[None]) -> None:
        loop = self._loop = uvloop.new_event_loop()
        try:
            loop.run_until_complete(self._serve(serving, slot_map, started))
        except BaseException as exc:
            if not started.done():
                started.set_exception(exc)
            log.error("api thread ended", extra={"error": repr(exc)})
        finally:
            loop.close()

    async def _serve(self, first: Serving, slot_map: SlotMap, started: concurrent.futures.Future[None]) -> None:
        settings = self.settings
        nc = await stream.connect(
            settings.nats_url_for(access.API), f"{settings.namespace}-api-{self.index}", access.API
        )
        publisher = Publisher(nc)
        publisher.start()
        shards = FailoverGateway(ShardClient(nc, settings.namespace), self.gateway)
        self.backend = LiveBackend(settings, self.latest or first, slot_map, shards, publisher)
        self.api_metrics = ApiMetrics()
        config = uvicorn.Config(
            create_app(self.backend, self.api_metrics, admin_token=settings.admin_token),
            log_config=None,
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=5,
            http=BoundedHttpTools,  # 431 past the header limits (api/http_limits.py)
        )
        self._server = _Server(config)
        serving = asyncio.create_task(
            self._server.serve(sockets=[listening_socket(settings.host, self.port, settings.api_workers > 1)])
        )
        while not self._server.started and not serving.done():
            await asyncio.sleep(0.01)
        if serving.done():
            serving.result()
        gc.freeze()  # the catalog and its rendered JSON live as long as the process: skip them in GC passes
        started.set_result(None)
        await serving
        # Stopped: flush what was submitted to NATS, then close.
        await publisher.drain()
        try:
            await nc.drain()
        except (NatsError, TimeoutError) as exc:  # what was buffered is lost; the publisher drained first
            log.warning("nats drain failed", extra={"error": repr(exc)})

    def _hand(self, update: Callable[..., None], *args: Any) -> None:
        """Run `update(*args)` on the HTTP loop, between two of its requests."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(update, *args)

    async def set_health(self, snapshot: dict[str, Any]) -> None:
        if self.backend is not None:
            self._hand(self.backend.set_health, snapshot)

    async def set_popularity(self, keys: np.ndarray, clicks: np.ndarray, impressions: np.ndarray) -> None:
        async with self._updating:
            latest, backend = self.latest, self.backend
            if latest is None or backend is None:
                return  # starting: it reads popularity itself
            popularity = Popularity(keys, clicks, impressions)
            self.latest = await asyncio.to_thread(Serving.build, latest.rendered, popularity, self.settings.policy())
            self._hand(backend.use, self.latest)

    async def reload_catalog(self) -> int:
        async with self._updating:
            latest, backend = self.latest, self.backend
            if latest is None or backend is None:
                raise Unavailable("the API is starting")
            async with short_lived_pool(self.settings.database_url or "", f"api-{self.index}") as pool:
                store = CatalogStore(pool)
                if await store.version() != latest.rendered.catalog.version:
                    rendered = await asyncio.to_thread(Rendered, await store.read())
                    latest = self.latest = await asyncio.to_thread(
                        Serving.build, rendered, latest.popularity, self.settings.policy()
                    )
                    self._hand(backend.use, latest)
            return latest.rendered.catalog.version

    async def stop(self) -> None:
        """Stop taking requests, flush what was submitted to NATS, close (bounded: 15 s)."""
        if self._server is not None and self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(setattr, self._server, "should_exit", True)
            await asyncio.to_thread(self._thread.join, 15)
        self._server = self._thread = None

    def status(self) -> dict[str, Any]:
        return {
            "api": self.index,
            "serving": self.serving,
            "port": self.port,
            "pid": os.getpid(),
            "publisher": self.backend.publisher.status() if self.backend else None,
            "fallback_slates": fallback_slates(self.api_metrics),
            "last_error": self._starting.last_error,
        }


def fallback_slates(metrics: ApiMetrics | None) -> int:
    """Slates answered from popularity so far, as the app counted them (`mabrec_recommendations`
    by source, api/routes.py); read from another thread than the HTTP one: the counter locks."""
    if metrics is None:
        return 0
    for family in metrics.slates.collect():
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.labels.get("source") == "popularity-fallback":
                return int(sample.value)
    return 0


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # in an actor (and off the main thread), signals belong to Ray


def listening_socket(host: str, port: int, shared: bool) -> socket.socket:
    """The API's listening socket. `shared` (several API actors): the others on this node bind
    it too (SO_REUSEPORT) and the kernel spreads connections over them; Linux lets only
    processes of the same user join, so run mabrec under a user of its own. A single API actor
    binds it alone: another process asking for the port is refused, and gets none of its traffic."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart does not wait out TIME_WAIT
    if shared:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock
