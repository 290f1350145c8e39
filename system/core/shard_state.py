"""A shard's in-memory state and its arithmetic: no I/O, no Ray, no awaits (so no interleaving).

Holds the users of the shard's slots, applies batches of feedback events with numpy, serves
slates through the policy, and tracks what changed since the last checkpoint.
"""

from __future__ import annotations

import sys
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from system.core import userstate
from system.core.arrays import ranges
from system.core.catalog import Catalog
from system.core.events import CLICKED, DEDUP_WINDOW, LAG_EDGES, SEEN, Event
from system.core.policy import Model, Picks, draw_slate
from system.core.policy_config import PolicyConfig
from system.core.sharding import slot_of

_OFFSET = 2**31  # keys are int32; shifted to pack (user, key) into one sortable int64


def recent_to_bytes(recent: array[int]) -> bytes:
    """Little-endian uint64s, whatever this machine's byte order (they live in PostgreSQL)."""
    if sys.byteorder == "big":
        recent = array("Q", recent)
        recent.byteswap()
    return recent.tobytes()


def recent_from_bytes(raw: bytes) -> array[int]:
    recent = array("Q", raw)
    if sys.byteorder == "big":
        recent.byteswap()
    return recent


@dataclass(slots=True)
class User:
    counts: np.ndarray  # see system/core/userstate.py
    recent: array[int]  # 63-bit hashes of the user's most recent event ids, oldest first


class ShardState:
    def __init__(
        self, catalog: Catalog, config: PolicyConfig | None = None, rng: np.random.Generator | None = None
    ) -> None:
        self.config = config or PolicyConfig()
        self.rng = rng or np.random.default_rng()
        self.users: dict[str, User] = {}
        self.dirty: set[str] = set()
        self.applied = 0  # events applied
        self.duplicates = 0  # events skipped as repeats of an event_id
        self.unknown_movies = 0  # movie ids not in the catalog, ignored
        self.lag_counts = np.zeros(len(LAG_EDGES) + 1, dtype=np.int64)
        self.global_counts: tuple[np.ndarray, np.ndarray] | None = None
        self.set_catalog(catalog)

    # --- catalog and global popularity -------------------------------------------------------

    def set_catalog(self, catalog: Catalog) -> None:
        """Switch catalogs; user state is keyed by stable ids, so nothing learned is lost."""
        self.catalog = catalog
        self.global_counts = None
        size = len(catalog.movies) + len(catalog.facets)
        self.local_clicks = np.zeros(size)
        self.local_seen = np.zeros(size)
        for user in self.users.values():
            self._count_locally(user.counts, 1)
        self.refresh_model()

    def set_global_counts(self, version: int, clicks: np.ndarray, seen: np.ndarray) -> None:
        """Popularity summed over all shards (the supervisor broadcasts it), for this catalog."""
        if version == self.catalog.version and len(clicks) == len(self.local_clicks):
            self.global_counts = (np.asarray(clicks, dtype=np.float64), np.asarray(seen, dtype=np.float64))
            self.refresh_model()

    def refresh_model(self) -> None:
        clicks, seen = self.global_counts or (self.local_clicks, self.local_seen)
        self.model = Model(self.catalog, self.config, clicks, seen)

    def _count_locally(self, counts: np.ndarray, sign: int) -> None:
        dense = self._dense(counts[:, userstate.KEY])
        ok = dense >= 0
        np.add.at(self.local_clicks, dense[ok], sign * counts[ok, userstate.CLICKS])
        np.add.at(self.local_seen, dense[ok], sign * counts[ok, userstate.IMPRESSIONS])

    def _dense(self, keys: np.ndarray) -> np.ndarray:
        """Dense popularity index of stable keys: movies first, then facets; -1 if unknown."""
        keys = np.asarray(keys, dtype=np.int64)
        dense = np.full(len(keys), -1, dtype=np.int64)
        movie = keys > 0
        dense[movie] = self.catalog.movie_index(keys[movie])
        fi = self.catalog.facet_index(-keys[~movie])
        dense[~movie] = np.where(fi >= 0, fi + len(self.catalog.movies), -1)
        return dense

    # --- users ------------------------------------------------------------------------------

    def load_user(self, uxid: str, counts: bytes, recent: bytes) -> None:
        user = User(userstate.from_bytes(counts), recent_from_bytes(recent))
        if uxid in self.users:
            self._count_locally(self.users[uxid].counts, -1)
        self.users[uxid] = user
        self._count_locally(user.counts, 1)

    def counts_of(self, uxid: str) -> np.ndarray:
        user = self.users.get(uxid)
        return userstate.empty() if user is None else user.counts

    # --- events -----------------------------------------------------------------------------

    def apply(self, events: Sequence[Event]) -> int:
        """Apply events in order; returns how many changed state (not duplicates)."""
        rows_user: list[int] = []
        rows_movie: list[int] = []
        rows_kind: list[int] = []
        applied = 0
        stamps: list[float] = []
        touched: list[User] = []
        index: dict[str, int] = {}
        known = self.catalog.id_set
        for event in events:
            if not any(m in known for m in event.movies):
                self.unknown_movies += len(event.movies)
                continue  # nothing to apply (the router dead-letters these; a replay skips them alike)
            user = self.users.get(event.user)
            if user is None:
                user = self.users[event.user] = User(userstate.empty(), array("Q"))
            if event.event_id is not None:
                h = event.id_hash
                if h in user.recent:
                    self.duplicates += 1
                    continue
                user.recent.append(h)
                if len(user.recent) > DEDUP_WINDOW:
                    del user.recent[0]
            u = index.get(event.user)
            if u is None:
                u = index[event.user] = len(touched)
                touched.append(user)
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
        return applied

    def _apply_rows(
        self, touched: list[User], row_user: np.ndarray, row_movie: np.ndarray, row_kind: np.ndarray
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
        dense = np.concatenate([mi, facet + len(catalog.movies)])
        clicks = (row_kind[owner] == CLICKED).astype(np.float64)
        seen = (row_kind[owner] == SEEN).astype(np.float64)
        n = len(self.local_clicks)
        self.local_clicks += np.bincount(dense, weights=clicks, minlength=n)
        self.local_seen += np.bincount(dense, weights=seen, minlength=n)

        packed = (row_user[owner].astype(np.int64) << 32) | (keys + _OFFSET)
        # `owner` is the row's place in event order: what came after a click is told apart.
        uniq, sum_clicks, sum_seen, since = userstate.aggregate(packed, clicks, seen, order=owner)
        users = uniq >> 32
        keys = ((uniq & 0xFFFFFFFF) - _OFFSET).astype(userstate.DTYPE)
        bounds = np.searchsorted(users, np.arange(len(touched) + 1))
        for u, user in enumerate(touched):
            a, b = bounds[u], bounds[u + 1]
            if a < b:
                user.counts = userstate.bump(user.counts, keys[a:b], sum_clicks[a:b], sum_seen[a:b], since[a:b])

    # --- serving and checkpoints --------------------------------------------------------------

    def slate(self, uxid: str, limit: int) -> Picks:
        """The user's slate: movie ids, best first, and why each is there."""
        slate = draw_slate(self.model, self.model.view(self.counts_of(uxid)), limit, self.rng)
        return self.catalog.movie_ids[slate.movies].tolist(), slate.reasons

    def take_dirty(self) -> list[tuple[str, int, bytes, bytes]]:
        """Snapshot (uxid, slot, counts, recent ids) of every changed user, and reset the set."""
        rows = [
            (uxid, slot_of(uxid), userstate.to_bytes(self.users[uxid].counts), recent_to_bytes(self.users[uxid].recent))
            for uxid in self.dirty
        ]
        self.dirty = set()
        return rows
