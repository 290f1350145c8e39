"""The HTTP API's host, as a plain class: Ray wraps it in actors/ray_api.py.

The API runs inside detached actors rather than in the supervisor, so it keeps answering while
the supervisor is down (crashed, restarting, being upgraded); several API actors can share the
port (SO_REUSEPORT) to use more cores. Each owns its NATS publisher and its view of the catalog;
the supervisor pushes it the health of the shards, the global popularity and catalog reloads.
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
import time
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import uvicorn
import uvloop

from api.app import create_app
from api.render import Rendered
from system import bus, db, userstate, wire
from system.errors import Unavailable
from system.events import Event
from system.policy import Model, Picks, recommend
from system.settings import Settings
from system.sharding import SlotMap
from system.store import CatalogStore, StateStore
from system.tasks import Background

log = logging.getLogger(__name__)

# How long a shard that failed a call is skipped (fallback slates at once) before it is tried again.
SHARD_DOWN_SECONDS = 1.0


class Gateway(Protocol):
    async def recommend(self, shard: int, uxid: str, limit: int) -> Picks: ...

    async def profile(self, shard: int, uxid: str) -> list[list[int]]: ...


class DataPlane:
    """Shards over NATS (system/wire.py); over Ray actor calls while NATS is down."""

    def __init__(self, nats: wire.ShardClient, ray: Gateway) -> None:
        self.nats = nats
        self.ray = ray

    async def recommend(self, shard: int, uxid: str, limit: int) -> Picks:
        if self.nats.connected:
            return await self.nats.recommend(shard, uxid, limit)
        return await self.ray.recommend(shard, uxid, limit)

    async def profile(self, shard: int, uxid: str) -> list[list[int]]:
        if self.nats.connected:
            return await self.nats.profile(shard, uxid)
        return await self.ray.profile(shard, uxid)


class LiveBackend:
    """The API's backend (see api/backend.py): shards through the gateway, NATS through the publisher."""

    def __init__(
        self, settings: Settings, rendered: Rendered, slot_map: SlotMap, gateway: Gateway, publisher: bus.Publisher
    ) -> None:
        self.settings = settings
        self.slot_map = slot_map
        self.gateway = gateway
        self.publisher = publisher
        self.policy = settings.policy()
        self.rng = np.random.default_rng()
        self.health: dict[str, Any] = {"shards": [], "consumer": {}, "at": 0.0}
        self.down_until: dict[int, float] = {}
        self.started = time.time()
        self.set_catalog(rendered)

    @property
    def catalog(self) -> Rendered:
        return self._rendered

    def set_catalog(self, rendered: Rendered) -> None:
        self._rendered = rendered
        self.model = Model(rendered.catalog, self.policy)

    def set_popularity(self, version: int, clicks: np.ndarray, seen: np.ndarray) -> None:
        if version == self._rendered.catalog.version:
            self.model = Model(self._rendered.catalog, self.policy, clicks, seen)

    def set_health(self, snapshot: dict[str, Any]) -> None:
        self.health = {**snapshot, "at": time.time()}
        for shard in snapshot.get("shards", []):
            if not shard.get("ready"):
                self.down_until[shard["shard"]] = time.monotonic() + SHARD_DOWN_SECONDS

    async def recommend(self, uxid: str, limit: int) -> Picks:
        shard = self.slot_map.shard_of(uxid)
        if self.down_until.get(shard, 0.0) > time.monotonic():
            raise Unavailable(f"shard {shard} is down")  # answer from popularity at once
        try:
            return await self.gateway.recommend(shard, uxid, limit)
        except Unavailable:
            self.down_until[shard] = time.monotonic() + SHARD_DOWN_SECONDS
            raise

    async def profile(self, uxid: str) -> list[list[int]]:
        return await self.gateway.profile(self.slot_map.shard_of(uxid), uxid)

    def fallback(self, limit: int) -> Picks:
        empty = self.model.view(userstate.empty())
        slate = recommend(self.model, empty, limit, self.rng)
        return self.catalog.catalog.movie_ids[slate.movies].tolist(), ["popular"] * len(slate.movies)

    def publish(self, events: Sequence[Event]) -> bool:
        return self.publisher.submit_many(self.subject, [e.encode() for e in events])

    async def publish_durably(self, events: Sequence[Event], timeout: float) -> None:
        await self.publisher.publish(self.subject, [e.encode() for e in events], timeout)

    @property
    def subject(self) -> str:
        return f"{self.settings.events_subject}.api"

    def readiness(self) -> dict[str, Any]:
        shards = {str(s["shard"]): bool(s.get("ready")) for s in self.health.get("shards", [])}
        consumer = bool(self.health.get("consumer", {}).get("running"))
        catalog = len(self._rendered.catalog) > 0
        ready = bool(shards) and all(shards.values()) and consumer and catalog and self.publisher.connected
        return {
            "ready": ready,
            "catalog": catalog,
            "consumer": consumer,
            "nats": self.publisher.connected,
            "shards": shards,
        }

    def status(self) -> dict[str, Any]:
        return {
            "uptime": round(time.time() - self.started, 1),
            "namespace": self.settings.namespace,
            "catalog": {"version": self._rendered.catalog.version, "movies": len(self._rendered.catalog)},
            "shards": self.health.get("shards", []),
            "consumer": self.health.get("consumer", {}),
            "supervisor_seen_seconds_ago": round(time.time() - self.health["at"], 1) if self.health["at"] else None,
            "publisher": self.publisher.status(),
            "stream_last_seq": self.health.get("stream_last_seq", 0),
            "ray_dashboard": self.health.get("ray_dashboard"),
        }


class ApiServer:
    """Serves HTTP on a thread of its own with a uvloop event loop: faster than the actor's
    loop, and Ray's calls into the actor (health pushes, reloads) never queue behind requests."""

    def __init__(self, settings: Settings, index: int, port: int, gateway: Gateway) -> None:
        # Cheap and I/O-free: Ray re-runs this on a restart; `ensure_serving` does the work.
        self.settings = settings
        self.index = index
        self.port = port
        self.gateway = gateway
        self.backend: LiveBackend | None = None
        self._server: uvicorn.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._starting = Background(self._start)

    @property
    def serving(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and bool(self._server and self._server.started)

    async def ensure_serving(self) -> dict[str, Any]:
        """Start serving unless serving or starting (idempotent, never waits). Returns `status()`."""
        if not self.serving:
            self._starting.ensure()
        return self.status()

    async def wait_serving(self) -> dict[str, Any]:
        if not self.serving:
            await self._starting.wait()
        return self.status()

    async def _start(self) -> None:
        settings = self.settings
        pool = await db.open_pool(settings.database_url or "", name=f"api-{self.index}")
        try:
            rendered = await asyncio.to_thread(Rendered, await CatalogStore(pool).read())
            slot_map = await StateStore(pool).slot_map()
        finally:
            await pool.close()
        started: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._run_http, args=(rendered, slot_map, started), name=f"http-{self.index}", daemon=True
        )
        self._thread.start()
        await asyncio.wrap_future(started)
        log.info(
            "api serving", extra={"host": settings.host, "port": self.port, "index": self.index, "pid": os.getpid()}
        )

    def _run_http(self, rendered: Rendered, slot_map: SlotMap, started: concurrent.futures.Future[None]) -> None:
        loop = self._loop = uvloop.new_event_loop()
        try:
            loop.run_until_complete(self._serve(rendered, slot_map, started))
        except BaseException as exc:
            if not started.done():
                started.set_exception(exc)
            log.error("api thread ended", extra={"error": repr(exc)})
        finally:
            loop.close()

    async def _serve(self, rendered: Rendered, slot_map: SlotMap, started: concurrent.futures.Future[None]) -> None:
        settings = self.settings
        nc = await bus.connect(settings.nats_url or "", f"{settings.namespace}-api-{self.index}")
        publisher = bus.Publisher(nc)
        publisher.start()
        shards = DataPlane(wire.ShardClient(nc, settings.namespace), self.gateway)
        self.backend = LiveBackend(settings, rendered, slot_map, shards, publisher)
        config = uvicorn.Config(
            create_app(self.backend), log_config=None, access_log=False, lifespan="on", timeout_graceful_shutdown=5
        )
        self._server = _Server(config)
        serving = asyncio.create_task(self._server.serve(sockets=[reusable_socket(settings.host, self.port)]))
        while not self._server.started and not serving.done():
            await asyncio.sleep(0.01)
        if serving.done():
            serving.result()
        gc.freeze()  # the catalog and its rendered JSON live as long as the process: skip them in GC passes
        started.set_result(None)
        await serving
        # Stopped: flush what was submitted to NATS, then close.
        await publisher.drain()
        with contextlib.suppress(Exception):
            await nc.drain()

    async def set_health(self, snapshot: dict[str, Any]) -> None:
        if self.backend is not None:
            self.backend.set_health(snapshot)

    async def set_popularity(self, version: int, clicks: np.ndarray, seen: np.ndarray) -> None:
        if self.backend is not None:
            self.backend.set_popularity(version, clicks, seen)

    async def reload_catalog(self) -> int:
        if self.backend is None:
            raise Unavailable("the API is starting")
        pool = await db.open_pool(self.settings.database_url or "", name=f"api-{self.index}")
        try:
            store = CatalogStore(pool)
            if await store.version() != self.backend.catalog.catalog.version:
                self.backend.set_catalog(await asyncio.to_thread(Rendered, await store.read()))
        finally:
            await pool.close()
        return self.backend.catalog.catalog.version

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
            "last_error": self._starting.last_error,
        }


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):  # type: ignore[no-untyped-def]
        yield  # in an actor (and off the main thread), signals belong to Ray


def reusable_socket(host: str, port: int) -> socket.socket:
    """A listening socket that other API actors on this node can bind too (SO_REUSEPORT): the
    kernel spreads connections over them."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock
