"""Global popularity: every user's clicks and impressions per movie and facet value, keyed as
user state is (movie id > 0, minus facet id < 0), so it outlives catalog reloads and shards."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from system.core.arrays import unique
from system.core.catalog import Catalog


@dataclass(frozen=True)
class Popularity:
    """Clicks and impressions per key (movie id > 0, minus facet id < 0), sorted by key."""

    keys: np.ndarray
    clicks: np.ndarray
    impressions: np.ndarray

    @classmethod
    def empty(cls) -> Popularity:
        return cls(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))

    @classmethod
    def total(cls, parts: Iterable[Popularity]) -> Popularity:
        """The parts added up, key by key."""
        parts = list(parts)
        if not parts:
            return cls.empty()
        keys = np.concatenate([p.keys for p in parts])
        uniq, inverse = unique(keys)
        clicks = np.bincount(inverse, weights=np.concatenate([p.clicks for p in parts]), minlength=len(uniq))
        seen = np.bincount(inverse, weights=np.concatenate([p.impressions for p in parts]), minlength=len(uniq))
        return cls(uniq, clicks.astype(np.int64), seen.astype(np.int64))

    @classmethod
    def of_user(cls, counts: np.ndarray) -> Popularity:
        """What one user's state rows (system/core/userstate.py, sorted by key) add to it."""
        return cls(counts[:, 0].astype(np.int64), counts[:, 1].astype(np.int64), counts[:, 2].astype(np.int64))

    def negated(self) -> Popularity:
        return Popularity(self.keys, -self.clicks, -self.impressions)

    def dense(self, catalog: Catalog) -> tuple[np.ndarray, np.ndarray]:
        """As the policy takes it: (clicks, impressions) over the catalog's movies, then its
        facet values, in their dense order; keys not in the catalog left out."""
        size = len(catalog.movies) + len(catalog.facets)
        index = np.full(len(self.keys), -1, dtype=np.int64)
        movie = self.keys > 0
        index[movie] = catalog.movie_index(self.keys[movie])
        facet = catalog.facet_index(-self.keys[~movie])
        index[~movie] = np.where(facet >= 0, facet + len(catalog.movies), -1)
        ok = index >= 0
        clicks = np.bincount(index[ok], weights=self.clicks[ok], minlength=size)
        impressions = np.bincount(index[ok], weights=self.impressions[ok], minlength=size)
        return clicks, impressions
