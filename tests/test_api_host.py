"""The API host (actors/api_host.py) without Ray: its HTTP server on a thread of its own, against
real PostgreSQL and NATS, while this test's event loop plays Ray's actor thread and pushes it
updates."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from nats.js import JetStreamContext

from actors.api_host import ApiHost
from system.core.catalog_file import SHIPPED, read_movies
from system.core.errors import Unavailable
from system.core.policy import Picks
from system.core.profile import UserProfile
from system.core.settings import Settings
from system.db.catalog_store import CatalogStore
from system.db.migrations import migrate
from system.db.pool import short_lived_pool
from system.db.state_store import StateStore
from system.local.processes import free_port

pytestmark = pytest.mark.integration


class NoShards:
    """No shard answers (nor over NATS: none listens), so every slate is the API's own fallback,
    ranked by the API's model of its catalog."""

    async def slate(self, shard: int, uxid: str, limit: int) -> Picks:
        raise Unavailable("no shard")

    async def profile(self, shard: int, uxid: str) -> UserProfile:
        raise Unavailable("no shard")

    async def erase(self, shard: int, uxid: str) -> dict[str, Any]:
        raise Unavailable("no shard")


async def test_a_catalog_reload_under_load_never_mixes_two_catalogs(settings: Settings, js: JetStreamContext) -> None:
    """Two catalogs in turn: 2,000 shipped movies (A), and their last 60 under other ids and names
    (B). While slates flow, the host reloads from one to the other (built on this thread, swapped
    on the HTTP loop): no request fails, every slate names movies of A only or of B only, each as
    its catalog names it, and every update of the backend ran on the HTTP server's thread.
    (Before, this thread swapped the rendered catalog, then built the model: a fallback slate in
    between took a model's indices of A into B's 60 movies, an IndexError, a 500; measured
    in-process, 5 of 794 fallbacks during 40 swaps.)"""
    a = list(read_movies(SHIPPED))[:2000]
    b = [dataclasses.replace(m, id=m.id + 1_000_000, name=f"B {m.name}") for m in a[-60:]]
    names = {m.id: m.name for m in a + b}
    await migrate(settings.database_url or "")
    async with short_lived_pool(settings.database_url or "", "test") as pool:
        store = CatalogStore(pool)
        await store.load(a, source="a")
        await StateStore(pool).ensure_slot_map(2)
        host = ApiHost(settings, 0, free_port(), NoShards())
        await host.ensure_serving()
        url = f"http://127.0.0.1:{host.port}"
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            while not host.serving:
                await asyncio.sleep(0.01)
            backend = host.backend
            assert backend is not None and host._thread is not None
            updated_on: set[int | None] = set()
            use, set_health = backend.use, backend.set_health

            def recorded(update: Callable[..., None]) -> Callable[..., None]:
                def on_thread(*args: Any) -> None:
                    updated_on.add(threading.get_ident())
                    update(*args)

                return on_thread

            backend.use, backend.set_health = recorded(use), recorded(set_health)  # type: ignore[method-assign]
            slates: list[list[dict[str, Any]]] = []
            failures: list[int] = []
            loading = True

            async def client(k: int) -> None:
                while loading:
                    answer = await http.get("/api/recommendations/movies", headers={"uxid": f"u{k}"})
                    if answer.status_code != 200:
                        failures.append(answer.status_code)
                    else:
                        slates.append(answer.json())

            clients = [asyncio.create_task(client(k)) for k in range(8)]
            try:
                for catalog in (b, a) * 4:
                    await store.load(catalog, source="swap")
                    await host.set_health({"shards": [{"shard": 0, "ready": False}], "slot_owners": [0] * 1024})
                    version = await host.reload_catalog()
                    assert version == await store.version()
                    seen = len(slates)
                    while len(slates) < seen + 20 and not failures:  # the swap reached the HTTP loop
                        await asyncio.sleep(0.01)
            finally:
                loading = False
                await asyncio.gather(*clients)
        host_thread = host._thread.ident
        await host.stop()
    assert failures == []
    assert updated_on == {host_thread}, "the backend was changed from another thread than the HTTP loop's"
    assert len(slates) > 80
    in_b = {m.id for m in b}
    for slate in slates:
        ids = {movie["id"] for movie in slate}
        assert len(slate) == 10 and (ids <= in_b or not ids & in_b), slate
        assert all(movie["name"] == names[movie["id"]] for movie in slate)
    assert any({m["id"] for m in s} <= in_b for s in slates) and any(not {m["id"] for m in s} & in_b for s in slates)
