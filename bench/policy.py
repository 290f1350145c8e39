"""Micro-benchmark of the policy: microseconds per slate on the shipped catalog, for cold users
and for users with history (20 touched movies; 300, about 3,000 and about 9,000 state rows),
measured in-process (no Ray, no HTTP). numpy's BLAS matters for the small matrix products of the policy: `run_both` measures
it as this environment sets OpenBLAS up and again with the OPENBLAS_* variables unset (some
machines set OPENBLAS_CORETYPE for old OpenBLAS builds), and names the kernel (threadpoolctl)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import numpy as np
from threadpoolctl import threadpool_info

from system.core.catalog import Catalog
from system.core.catalog_file import SHIPPED, read_movies
from system.core.events import CLICKED, SEEN, Event
from system.core.shard_state import ShardState

# Users with history: (name, users, slates of 10 impressions each, a click every 10 slates).
# 28 slates make about 300 state rows (280 movies, then the 21 genres); 300 slates about 3,000;
# 2,500 slates cover most of the catalog (about 9,000 rows): a slate's cost must not follow.
HISTORIES = (("rows300", 200, 28), ("rows3000", 20, 300), ("rows9000", 10, 2500))


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
    for name, users, slates in HISTORIES:
        for u in range(users):
            events = []
            for k in range(slates):
                picks = tuple(int(m) for m in rng.choice(ids, 10, replace=False))
                events.append(Event(f"{name}-{u}", SEEN, picks))
                if k % 10 == 0:
                    events.append(Event(f"{name}-{u}", CLICKED, picks[:1]))
            state.apply(events)
    state.refresh_model()
    out: dict[str, Any] = {}
    groups = [("cold", 0), ("warm", 200)] + [(name, users) for name, users, _ in HISTORIES]
    for name, users in groups:
        uxids = (
            [f"{name}-{i}" for i in range(rounds)] if name == "cold" else [f"{name}-{i % users}" for i in range(rounds)]
        )
        for uxid in uxids[:users]:  # as a shard serves them: the policy's digest of a long history kept
            state.slate(uxid, 10)
        began = time.process_time()
        for uxid in uxids:
            state.slate(uxid, 10)
        out[f"{name}_us_per_slate"] = round((time.process_time() - began) / rounds * 1e6, 1)
        if users:
            out[f"{name}_rows"] = round(float(np.mean([len(state.counts_of(f"{name}-{u}")) for u in range(users)])), 1)
    out["blas"] = blas()
    return out


def blas() -> str:
    """numpy's BLAS: library, version and kernel, and the OPENBLAS_* variables set."""
    info: dict[str, Any] = next((i for i in threadpool_info() if i.get("user_api") == "blas"), {})
    env = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("OPENBLAS_"))
    return f"{info.get('internal_api', '?')} {info.get('version', '?')}, kernel {info.get('architecture', '?')}" + (
        f" ({env})" if env else " (no OPENBLAS_* variable)"
    )


def run_both(rounds: int = 2000) -> dict[str, Any]:
    """As this environment sets OpenBLAS up, and with the OPENBLAS_* variables unset."""
    here = run(rounds)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENBLAS_")}
    unset = subprocess.run(
        [sys.executable, "-m", "bench.policy", str(rounds)], env=env, capture_output=True, text=True, check=True
    )
    return here | {"openblas_unset": json.loads(unset.stdout)}


if __name__ == "__main__":
    print(json.dumps(run(int(sys.argv[1]) if len(sys.argv) > 1 else 2000)))
