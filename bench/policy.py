"""Micro-benchmark of the policy: microseconds per slate on the shipped catalog, for cold users
and for users with history, measured in-process (no Ray, no HTTP)."""

from __future__ import annotations

import time

import numpy as np

from system.core.catalog import Catalog
from system.core.catalog_file import SHIPPED, read_movies
from system.core.events import CLICKED, SEEN, Event
from system.core.shard_state import ShardState


def run(rounds: int = 2000, seed: int = 0) -> dict[str, float]:
    catalog = Catalog.from_movies(list(read_movies(SHIPPED)))
    rng = np.random.default_rng(seed)
    state = ShardState(catalog, rng=rng)
    ids = catalog.movie_ids
    # Warm users: 20 touched movies each (what the memory target assumes), clicks and impressions.
    for u in range(200):
        state.apply(
            [Event(f"warm-{u}", SEEN, tuple(int(m) for m in rng.choice(ids, 10, replace=False)))]
            + [Event(f"warm-{u}", CLICKED, (int(m),)) for m in rng.choice(ids, 10, replace=False)]
        )
    state.refresh_model()
    out = {}
    for name, users in (
        ("cold", [f"cold-{i}" for i in range(rounds)]),
        ("warm", [f"warm-{i % 200}" for i in range(rounds)]),
    ):
        began = time.perf_counter()
        for uxid in users:
            state.slate(uxid, 10)
        out[f"{name}_us_per_slate"] = round((time.perf_counter() - began) / rounds * 1e6, 1)
    return out


if __name__ == "__main__":
    print(run())
