"""What the API needs from the rest of the system. The supervisor provides the live one (Ray
shards, NATS); tests may provide their own. The API never imports Ray."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from api.render import Rendered
from system.core.events import Event
from system.core.policy import Picks
from system.core.profile import UserProfile


class Backend(Protocol):
    @property
    def catalog(self) -> Rendered:
        """The current catalog, pre-rendered (swapped atomically on reload)."""
        ...

    async def slate(self, uxid: str, limit: int) -> Picks:
        """Movie ids for the user, best first, with why each is there. Raises
        system.errors.Unavailable when the user's shard cannot answer."""
        ...

    async def profile(self, uxid: str) -> UserProfile:
        """The user's evidence rows (key, clicks, impressions; see system/core/userstate.py) and
        their last slate, if their shard remembers it."""
        ...

    async def erase(self, uxid: str) -> dict[str, Any]:
        """Erase the user (actors/shard.py `erase`): their state at once, the event log after."""
        ...

    async def erasures(self) -> list[dict[str, Any]]:
        """The latest erasures, newest first, without whom they were for."""
        ...

    def fallback(self, limit: int) -> Picks:
        """A non-personalized slate (global popularity) for when a shard is down."""
        ...

    def publish(self, events: Sequence[Event]) -> bool:
        """Queue events for the event stream; False when the buffer is full."""
        ...

    async def publish_durably(self, events: Sequence[Event], timeout: float) -> int:
        """Return once every one of the events is in the event stream, all in one message (the
        log holds all of them or none), with that message's stream sequence; Unavailable if that
        cannot happen in time, PayloadTooLarge if they do not fit in one message."""
        ...

    async def set_desired_shards(self, shards: int) -> None:
        """Ask for `shards` shards: the supervisor moves slots until the deployment has them."""
        ...

    def readiness(self) -> dict[str, Any]: ...

    def status(self) -> dict[str, Any]: ...
