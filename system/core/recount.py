"""The reference recount: every user's state from the event log, in a few lines of plain Python.

It shares no code with `ShardState` (no numpy, no batching), only the contract
(system/core/events.py): an event counts when at least one of its movies is in the catalog and
its `event_id` was not seen for the user within the de-duplication window (by stream time);
each known movie, and each facet value the movie carries, gains a click or an impression;
`since_click` counts the impressions after the last click. `mabrec verify` and the property
tests compare the shards' arithmetic against it, so it proves the arithmetic as well as the
delivery.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from system.core.events import CLICKED, Event, id_hash

Row = tuple[int, int, int, int]  # (key, clicks, impressions, impressions since the last click)


@dataclass
class Recounted:
    """One user's state as the contract defines it: rows sorted by key (a movie is its id, a
    facet value minus its id), and the user's seen event ids with their stream seconds."""

    counts: dict[int, list[int]] = field(default_factory=dict)
    seen: list[tuple[int, int]] = field(default_factory=list)  # (id hash, stream second), oldest first

    def rows(self) -> list[Row]:
        return [(key, c[0], c[1], c[2]) for key, c in sorted(self.counts.items())]

    def seen_ids(self) -> tuple[list[int], list[int]]:
        return [h for h, _ in self.seen], [t for _, t in self.seen]

    def count(self, event: Event, second: int, facets_of: Mapping[int, Sequence[int]], window: int, cap: int) -> bool:
        """Apply one event; False when it does not count (a repeat within the window)."""
        if event.event_id is not None:
            second = max(second, self.seen[-1][1]) if self.seen else second  # a user's clock never goes back
            digest = id_hash(event.event_id)
            earlier = [t for h, t in self.seen if h == digest]
            if earlier and second - earlier[0] <= window:
                return False
            self.seen = [(h, t) for h, t in self.seen if h != digest] + [(digest, second)]
            self.seen = [(h, t) for h, t in self.seen if t >= second - window]
            self.seen = self.seen[max(len(self.seen) - cap, 0) :]
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
    log: Iterable[tuple[int, int, Sequence[Event]]],
    facets_of: Mapping[int, Sequence[int]],
    *,
    window: int,
    cap: int,
    cutoff: Callable[[str], int] | None = None,
    start: Mapping[str, Recounted] | None = None,
) -> dict[str, Recounted]:
    """Every user's state after the events of `log` ((stream sequence, stream second, events),
    in stream order), from `start` (checkpointed states, when the log does not reach back to
    the beginning) or from nothing; each user's events only through their `cutoff(user)`
    sequence when given. `facets_of` maps each catalog movie id to its facet values' ids."""
    users = {uxid: Recounted(dict(r.counts), list(r.seen)) for uxid, r in (start or {}).items()}
    for seq, second, events in log:
        for event in events:
            if cutoff is not None and seq > cutoff(event.user):
                continue
            if not any(movie in facets_of for movie in event.movies):
                continue  # nothing to count, and not remembered as seen either
            users.setdefault(event.user, Recounted()).count(event, second, facets_of, window, cap)
    return users
