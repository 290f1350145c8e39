"""What the API needs from the rest of the system. The supervisor provides the live one (Ray
shards, NATS); tests may provide their own. The API never imports Ray."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from api.render import Rendered
from system.core.events import Event
from system.core.policy import Picks


class Backend(Protocol):
    @property
    def catalog(self) -> Rendered:
        """The current catalog, pre-rendered (swapped atomically on reload)."""
        ...

    async def slate(self, uxid: str, limit: int) -> Picks:
        """Movie ids for the user, best first, with why each is there. Raises
        system.errors.Unavailable when the user's shard cannot answer."""
        ...

    async def profile(self, uxid: str) -> list[list[int]]:
        """The user's evidence rows (key, clicks, impressions); see system/core/userstate.py."""
        ...

    def fallback(self, limit: int) -> Picks:
        """A non-personalized slate (global popularity) for when a shard is down."""
        ...

    def publish(self, events: Sequence[Event]) -> bool:
        """Queue events for the event stream; False when the buffer is full."""
        ...

    async def publish_durably(self, events: Sequence[Event], timeout: float) -> int:
        """Return once the events are in the event stream, with the stream sequence they reach;
        Unavailable if that cannot happen in time."""
        ...

    async def set_desired_shards(self, shards: int) -> None:
        """Ask for `shards` shards: the supervisor moves slots until the deployment has them."""
        ...

    def readiness(self) -> dict[str, Any]: ...

    def status(self) -> dict[str, Any]: ...
