"""The API's live backend routing a request to its shard, on a gateway of this test's making (no
services): which failures take a shard for down, which do not."""

from __future__ import annotations

from typing import Any, cast

import pytest

from actors.live_backend import LiveBackend, Serving
from api.render import Rendered
from system.bus.publisher import Publisher
from system.core.catalog import Catalog
from system.core.catalog_file import read_movies
from system.core.errors import NotThisOne, Unavailable
from system.core.policy import Picks
from system.core.popularity import Popularity
from system.core.profile import UserProfile
from system.core.settings import Settings
from system.core.sharding import SlotMap
from tests.conftest import SMALL_CSV


class Gateway:
    def __init__(self) -> None:
        self.fail: dict[str, Exception] = {}
        self.asked: list[str] = []

    async def slate(self, shard: int, uxid: str, limit: int) -> Picks:
        self.asked.append(uxid)
        if uxid in self.fail:
            raise self.fail[uxid]
        return [1], ["popular"]

    async def profile(self, shard: int, uxid: str) -> UserProfile:
        raise NotImplementedError

    async def erase(self, shard: int, uxid: str) -> dict[str, Any]:
        raise NotImplementedError


def backend(gateway: Gateway) -> LiveBackend:
    settings = Settings()
    serving = Serving.build(
        Rendered(Catalog.from_movies(list(read_movies(SMALL_CSV)))), Popularity.empty(), settings.policy()
    )
    return LiveBackend(settings, serving, SlotMap.even(1), gateway, cast(Publisher, None))


async def test_one_failed_request_does_not_take_its_shard_for_down() -> None:
    gateway = Gateway()
    live = backend(gateway)
    gateway.fail["bad"] = NotThisOne("shard 0: the state of 'bad' is still being read")
    with pytest.raises(NotThisOne):
        await live.slate("bad", 5)
    assert await live.slate("good", 5) == ([1], ["popular"]) and gateway.asked == ["bad", "good"]
    # A shard that fails a whole call is skipped for a moment: its users get popularity at once.
    gateway.fail["worse"] = Unavailable("shard 0 did not answer")
    with pytest.raises(Unavailable):
        await live.slate("worse", 5)
    with pytest.raises(Unavailable, match="is down"):
        await live.slate("good", 5)
    assert gateway.asked == ["bad", "good", "worse"]
