"""The reference recount: every user's counts from the event log, in a few lines of plain Python.

It shares no code with `ShardState` (no numpy, no batching), only the contract: an event counts
when at least one of its movies is in the catalog and its `event_id` is not among the user's last
DEDUP_WINDOW ones; each known movie, and each facet value the movie carries, gains a click or an
impression; `since_click` counts the impressions after the last click. `mabrec verify` and the
property tests compare the shards' arithmetic against it, so it proves the arithmetic as well as
the delivery.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from system.core.events import CLICKED, DEDUP_WINDOW, Event, id_hash

Row = tuple[int, int, int, int]  # (key, clicks, impressions, impressions since the last click)


@dataclass
class Recounted:
    """One user's state as the contract defines it: rows sorted by key (a movie is its id, a
    facet value minus its id), and the hashes of the user's last event ids, oldest first."""

    counts: dict[int, list[int]] = field(default_factory=dict)
    recent: list[int] = field(default_factory=list)

    def rows(self) -> list[Row]:
        return [(key, c[0], c[1], c[2]) for key, c in sorted(self.counts.items())]

    def count(self, event: Event, facets_of: Mapping[int, Sequence[int]]) -> bool:
        """Apply one event; False when it does not count (a repeat, or no movie in the catalog)."""
        if event.event_id is not None:
            digest = id_hash(event.event_id)
            if digest in self.recent:
                return False
            self.recent = [*self.recent, digest][-DEDUP_WINDOW:]
        for movie in event.movies:
            if movie in facets_of:
                for key in (movie, *(-f for f in facets_of[movie])):
                    clicks, impressions, since = self.counts.get(key, (0, 0, 0))
                    if event.kind == CLICKED:
                        self.counts[key] = [clicks + 1, impressions, 0]
                    else:
                        self.counts[key] = [clicks, impressions + 1, since + 1]
        return True


def recount(
    log: Iterable[tuple[int, Sequence[Event]]],
    facets_of: Mapping[int, Sequence[int]],
    cutoff: Callable[[str], int] | None = None,
) -> dict[str, Recounted]:
    """Every user's state after the events of `log` ((stream sequence, events) in stream order),
    each user's only through their `cutoff(user)` sequence when given. `facets_of` maps each
    catalog movie id to the ids of its facet values."""
    users: dict[str, Recounted] = {}
    for seq, events in log:
        for event in events:
            if cutoff is not None and seq > cutoff(event.user):
                continue
            if not any(movie in facets_of for movie in event.movies):
                continue  # nothing to count, and not remembered as seen either
            users.setdefault(event.user, Recounted()).count(event, facets_of)
    return users
