"""A shard's in-memory state and its arithmetic: no I/O, no Ray, no awaits (so no interleaving).

Holds the resident users of the shard's slots, applies batches of feedback events with numpy,
serves slates through the policy, and tracks what changed since the last checkpoint: the users
(`dirty`) and what their events add to global popularity. Memory follows the active users: past
`resident_users`, the users idle longest that are checkpointed already are evicted, and the
shard (actors/shard.py) loads a user again from PostgreSQL before it touches them.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from itertools import islice
from typing import Final

import numpy as np

from system.core import userstate
from system.core.arrays import ranges
from system.core.catalog import Catalog
from system.core.checkpointed import CheckpointedUsers
from system.core.dedup import SeenIds
from system.core.events import CLICKED, LAG_EDGES, SEEN, Event
from system.core.limits import DEDUP_MAX_IDS, DEDUP_WINDOW_HOURS, RESIDENT_USERS
from system.core.policy import Digest, Model, Picks, draw_slate, tastes
from system.core.policy_config import PolicyConfig
from system.core.popularity import Popularity
from system.core.sharding import slot_of

# A resident user: (counts, seen event ids as SeenIds bytes, the policy's digest of the counts
# or None), a plain tuple of plain values. The garbage collector stops tracking such a tuple, so
# its full passes never walk the users: over 250,000 user objects (the default budget) a pass
# stalled the shard for 120 ms. The ids stay in their checkpoint form; an event with an id
# decodes them (about 2 µs). The digest is kept for users whose state outgrew it: their slates
# then cost the same however long their history (policy.Model.digest); the events' apply keeps
# it current, and it leaves with the counts it sums.
User = tuple[np.ndarray, bytes, Digest | None]
COUNTS: Final = 0  # see system/core/userstate.py
SEEN_IDS: Final = 1  # see system/core/dedup.py
DIGEST: Final = 2


def new_user() -> User:
    return userstate.empty(), b"", None


class ShardState:
    def __init__(
        self,
        catalog: Catalog,
        config: PolicyConfig | None = None,
        rng: np.random.Generator | None = None,
        *,
        dedup_window: int = round(DEDUP_WINDOW_HOURS * 3600),
        dedup_max_ids: int = DEDUP_MAX_IDS,
        resident_users: int = RESIDENT_USERS,
    ) -> None:
        self.config = config or PolicyConfig()
        self.rng = rng or np.random.default_rng()
        self.dedup_window = dedup_window
        self.dedup_max_ids = dedup_max_ids
        self.resident_users = resident_users
        # Resident users, least recently used first (a user is moved to the end when touched).
        self.users: dict[str, User] = {}
        self.dirty: set[str] = set()
        # Users whose changes are in a checkpoint being written: not evictable until it is in
        # PostgreSQL, or their next event would load the older state and lose what it held.
        self.saving: set[str] = set()
        # Users with a checkpoint, for the slots indexed so far: the others need no read.
        self.checkpointed = CheckpointedUsers()
        self.applied = 0  # events applied
        self.duplicates = 0  # events skipped as repeats of an event_id
        self.unknown_movies = 0  # movie ids not in the catalog, ignored
        self.evicted = 0  # users evicted to stay within `resident_users`
        self.digests_summed = 0  # digests of users with a long history summed afresh at a slate
        self.lag_counts = np.zeros(len(LAG_EDGES) + 1, dtype=np.int64)
        self.lag_seconds = 0.0  # the lags' sum: with the counts, a Prometheus histogram
        # Popularity: what all users' checkpoints held when last told, plus what this shard's
        # events added since (`pending`, until a checkpoint takes it).
        self.known = Popularity.empty()
        self.pending: list[Popularity] = []
        self.catalog = catalog
        self.model = Model(catalog, self.config)

    # --- catalog and global popularity -------------------------------------------------------

    def set_catalog(self, catalog: Catalog) -> None:
        """Switch catalogs; user state is keyed by stable ids, so nothing learned is lost."""
        self.catalog = catalog
        self.refresh_model()

    def set_popularity(self, popularity: Popularity) -> None:
        """Every user's popularity as PostgreSQL holds it (read at restore, then pushed by the
        supervisor every few seconds): it includes what this shard checkpointed."""
        self.known = popularity
        self.refresh_model()

    def refresh_model(self) -> None:
        """Rebuild the policy's shared part from the catalog and the best-known popularity."""
        totals = Popularity.total([self.known, *self.pending])
        self.model = Model(self.catalog, self.config, *totals.dense(self.catalog), previous=self.model)

    def take_popularity(self) -> Popularity:
        """What the events since the last call add to popularity (for a checkpoint to commit)."""
        delta = Popularity.total(self.pending)
        self.pending = []
        self.known = Popularity.total([self.known, delta])
        return delta

    def give_back(self, delta: Popularity) -> None:
        """A checkpoint failed: its popularity goes out with the next one."""
        self.known = Popularity.total([self.known, delta.negated()])
        self.pending.append(delta)

    # --- users ------------------------------------------------------------------------------

    def missing(self, uxids: Iterable[str]) -> list[str]:
        """Those of these users who are not resident (to be loaded before they are touched)."""
        users = self.users
        return list(dict.fromkeys(u for u in uxids if u not in users))

    def admit(self, asked: Sequence[str], rows: Iterable[tuple[str, bytes, bytes]]) -> None:
        """Make `asked` users resident: from their checkpoints (`rows`: uxid, counts, seen ids),
        or empty for those without one (new users). A user already resident is kept as is:
        memory is never older than the checkpoint."""
        users = self.users
        for uxid, counts, seen in rows:
            if uxid not in users:
                users[uxid] = userstate.from_bytes(counts), seen, None
        for uxid in asked:
            if uxid not in users:
                users[uxid] = new_user()

    def release(self, slots: frozenset[int]) -> int:
        """Forget the users of these slots (they move to another shard, which loads them from
        their checkpoints). Their changes must be checkpointed already. Returns how many left."""
        leaving = [u for u in self.users if slot_of(u) in slots]
        if self.dirty.intersection(leaving):
            raise ValueError("a user with changes not checkpointed cannot leave")
        self.checkpointed.forget(slots)
        for uxid in leaving:
            del self.users[uxid]
        return len(leaving)

    def erase(self, uxid: str, saved: np.ndarray | None) -> bool:
        """Forget a user entirely: they asked to be erased. `saved`: the rows of their checkpoint,
        deleted from PostgreSQL with what it added to popularity; what they added since leaves
        the pending popularity as well. Returns whether they were in memory."""
        user = self.users.pop(uxid, None)
        self.dirty.discard(uxid)
        checkpointed = Popularity.empty() if saved is None else Popularity.of_user(saved)
        self.known = Popularity.total([self.known, checkpointed.negated()])
        if user is not None:
            self.pending.append(Popularity.total([checkpointed, Popularity.of_user(user[COUNTS]).negated()]))
        self.refresh_model()
        return user is not None

    def counts_of(self, uxid: str) -> np.ndarray:
        user = self.users.get(uxid)
        return userstate.empty() if user is None else user[COUNTS]

    def evict(self) -> int:
        """Evict the users idle longest, checkpointed already, down to `resident_users`.
        Returns how many left memory. Dirty users stay (their state is not in PostgreSQL yet)."""
        excess = len(self.users) - self.resident_users
        if excess <= 0:
            return 0
        pinned = self.dirty | self.saving if self.saving else self.dirty
        # The least recently used first; scanning a little more than needed skips pinned ones.
        victims = [u for u in islice(self.users, excess + len(pinned)) if u not in pinned][:excess]
        for uxid in victims:
            del self.users[uxid]
        self.evicted += len(victims)
        return len(victims)

    # --- events -----------------------------------------------------------------------------

    def apply(self, events: Sequence[Event], at: Sequence[int] | int = 0) -> int:
        """Apply events in order; returns how many changed state (not duplicates). `at` is each
        event's stream second (or one for all): the clock of the de-duplication window. A user
        not resident starts empty here: the caller loads users from their checkpoint first."""
        seconds = [at] * len(events) if isinstance(at, int) else at
        rows_user: list[int] = []
        rows_movie: list[int] = []
        rows_kind: list[int] = []
        applied = 0
        stamps: list[float] = []
        touched: list[str] = []
        index: dict[str, int] = {}
        known = self.catalog.id_set
        users = self.users
        window, cap = self.dedup_window, self.dedup_max_ids
        for event, second in zip(events, seconds, strict=True):
            if known.isdisjoint(event.movies):
                self.unknown_movies += len(event.movies)
                continue  # nothing to apply (the router dead-letters these; a replay skips them alike)
            user = users.pop(event.user, None) or new_user()
            users[event.user] = user  # now the most recently used
            if event.event_id is not None:
                seen = SeenIds.from_bytes(user[SEEN_IDS])
                if not seen.admit(event.id_hash, second, window, cap):
                    self.duplicates += 1
                    continue
                users[event.user] = user[COUNTS], seen.to_bytes(), user[DIGEST]
            u = index.get(event.user)
            if u is None:
                u = index[event.user] = len(touched)
                touched.append(event.user)
            self.dirty.add(event.user)
            applied += 1
            if event.ts is not None:
                stamps.append(event.ts)
            rows_user.extend([u] * len(event.movies))
            rows_movie.extend(event.movies)
            rows_kind.extend([event.kind] * len(event.movies))
        if rows_user:
            self._apply_rows(touched, np.array(rows_user), np.array(rows_movie), np.array(rows_kind))
        self.applied += applied
        if stamps:
            lags = time.time() - np.array(stamps)
            np.add.at(self.lag_counts, np.searchsorted(LAG_EDGES, lags), 1)
            self.lag_seconds += float(lags.sum())
        return applied

    def _apply_rows(
        self, touched: list[str], row_user: np.ndarray, row_movie: np.ndarray, row_kind: np.ndarray
    ) -> None:
        """Vectorized: every (user, movie, kind) row bumps the movie and each of its facets."""
        catalog = self.catalog
        mi = catalog.movie_index(row_movie)
        known = mi >= 0
        self.unknown_movies += int((~known).sum())
        row_user, mi, row_kind = row_user[known], mi[known], row_kind[known]
        starts = catalog.movie_facets_ptr[mi]
        lengths = catalog.movie_facets_ptr[mi + 1] - starts
        facet = catalog.pair_facet[ranges(starts, lengths)]
        owner = np.concatenate([np.arange(len(mi)), np.repeat(np.arange(len(mi)), lengths)])
        keys = np.concatenate([catalog.movie_ids[mi].astype(np.int64), -catalog.facet_ids[facet].astype(np.int64)])
        clicks = (row_kind[owner] == CLICKED).astype(np.float64)
        seen = (row_kind[owner] == SEEN).astype(np.float64)
        self.pending.append(Popularity(keys, clicks.astype(np.int64), seen.astype(np.int64)))

        packed = userstate.pack(row_user[owner], keys)
        # `owner` is the row's place in event order: what came after a click is told apart.
        uniq, sum_clicks, sum_seen, since = userstate.aggregate(packed, clicks, seen, order=owner)
        users, keys = userstate.unpack(uniq)
        resident = self.users
        before = [resident[u] for u in touched]
        states = userstate.bump_many([user[COUNTS] for user in before], users, keys, sum_clicks, sum_seen, since)
        model = self.model
        for u, (uxid, user, counts) in enumerate(zip(touched, before, states, strict=True)):
            digest = user[DIGEST]
            if digest is not None:  # bump_many left the old counts as they were: the digest takes the difference
                if digest[0] == model.version:
                    lo, hi = np.searchsorted(users, [u, u + 1])
                    movies = keys[lo:hi][keys[lo:hi] > 0]
                    digest = model.add_to_digest(
                        digest, userstate.rows_of(user[COUNTS], movies), userstate.rows_of(counts, movies)
                    )
                else:
                    digest = None  # summed under an older model: the next slate sums it again
            resident[uxid] = counts, user[SEEN_IDS], digest  # in place: its place in the LRU order stays

    # --- serving and checkpoints --------------------------------------------------------------

    def slate(self, uxid: str, limit: int) -> Picks:
        """The user's slate: movie ids, best first, and why each is there."""
        model = self.model
        user = self.users.pop(uxid, None)
        if user is None:
            view = model.view(userstate.empty())
        else:
            counts, digest = user[COUNTS], user[DIGEST]
            if digest is None or digest[0] != model.version:
                digest = model.digest(counts)
                if counts.nbytes >= digest[3].nbytes:  # keep it once the state outgrew it
                    user = counts, user[SEEN_IDS], digest
                    self.digests_summed += 1  # (a pass over the history that a kept digest would spare)
            self.users[uxid] = user  # now the most recently used
            view = model.view(counts, digest)
        slate = draw_slate(model, view, limit, self.rng)
        return self.catalog.movie_ids[slate.movies].tolist(), slate.reasons

    def tastes(self, uxid: str) -> list[tuple[int, int, float, float]]:
        """The user's clicked facet values as the policy weighs them (policy.Tastes): (facet id,
        clicks, posterior mean lift, cautious lift), best supported first."""
        model = self.model
        liked = tastes(model, model.view(self.counts_of(uxid)))
        ids = self.catalog.facet_ids[liked.facet]
        rows = zip(ids.tolist(), liked.clicks.tolist(), liked.lift.tolist(), liked.cautious.tolist(), strict=True)
        return sorted(
            ((f, int(c), round(m, 4), round(lo, 4)) for f, c, m, lo in rows), key=lambda t: (-t[3], -t[1], t[0])
        )

    def take_dirty(self) -> list[tuple[str, int, bytes, bytes]]:
        """Snapshot (uxid, slot, counts, seen ids) of every changed user, and reset the set.
        From here on they count as checkpointed: the write may land at any moment."""
        users = self.users
        self.checkpointed.add(self.dirty)
        rows = [
            (uxid, slot_of(uxid), userstate.to_bytes(users[uxid][COUNTS]), users[uxid][SEEN_IDS]) for uxid in self.dirty
        ]
        self.saving, self.dirty = self.dirty, set()
        return rows

    def saved(self) -> None:
        """The last `take_dirty`'s rows are in PostgreSQL (or back in `dirty`, the write failed)."""
        self.saving = set()
