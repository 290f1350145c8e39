"""`mabrec bench memory`: the memory of N users' bandit state, each with M touched movies (and
the facet values those movies carry), held the way shards hold it, spread over S shards."""

from __future__ import annotations

import gc
import os
from array import array
from collections.abc import Callable
from typing import Any

import numpy as np
import psutil

from system.core import userstate
from system.core.arrays import ranges
from system.core.catalog import Catalog
from system.core.catalog_file import SHIPPED, read_movies
from system.core.dedup import SeenIds
from system.core.shard_state import COUNTS, ShardState
from system.core.sharding import SlotMap


def run(
    users: int = 1_000_000, movies: int = 20, shards: int = 4, progress: Callable[[float], None] | None = None
) -> dict[str, Any]:
    catalog = Catalog.from_movies(list(read_movies(SHIPPED)))
    states = [ShardState(catalog) for _ in range(shards)]
    slot_map = SlotMap.even(shards)
    rng = np.random.default_rng(0)
    gc.collect()
    before = psutil.Process(os.getpid()).memory_info().rss
    for u in range(users):
        uxid = f"user-{u:07d}"
        picked = rng.choice(len(catalog), movies, replace=False)
        starts = catalog.movie_facets_ptr[picked]
        facets = catalog.pair_facet[ranges(starts, catalog.movie_facets_ptr[picked + 1] - starts)]
        keys = np.concatenate([catalog.movie_ids[picked].astype(np.int64), -catalog.facet_ids[facets].astype(np.int64)])
        keys, clicks, seen, since = userstate.aggregate(keys, np.zeros(len(keys)), np.ones(len(keys)))
        ids = movies + 2  # an impression or a click per movie, and two slates: one id each
        seen_ids = SeenIds(array("Q", rng.integers(1, 2**62, ids).tolist()), array("I", [1_800_000_000] * ids))
        counts = userstate.bump(userstate.empty(), keys, clicks, seen, since)
        states[slot_map.shard_of(uxid)].users[uxid] = (counts, seen_ids.to_bytes(), None)
        if progress and u % 10_000 == 0:
            progress(u / users)
    gc.collect()
    after = psutil.Process(os.getpid()).memory_info().rss
    rows = sum(len(x[COUNTS]) for s in states for x in s.users.values())
    return {
        "users": users,
        "movies_per_user": movies,
        "rows_per_user": round(rows / users, 1),
        "shards": shards,
        "rss_bytes": after - before,
        "rss_gib": round((after - before) / 2**30, 3),
        "bytes_per_user": round((after - before) / users),
        "checkpoint_bytes_per_user": round(rows / users * 16 + (movies + 2) * 12),
    }
