"""Micro-benchmark of the policy: microseconds per slate on the shipped catalog, for cold users
and for users with history (20 touched movies, and 300 state rows), measured in-process (no Ray,
no HTTP). numpy's BLAS matters for the small matrix products of the policy: `run_both` measures
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
    # Users with 300 state rows: 28 slates of impressions (about 280 movies, then the 21 genres)
    # and a click every 10 slates.
    for u in range(200):
        events = []
        for k in range(28):
            picks = tuple(int(m) for m in rng.choice(ids, 10, replace=False))
            events.append(Event(f"rows300-{u}", SEEN, picks))
            if k % 10 == 0:
                events.append(Event(f"rows300-{u}", CLICKED, picks[:1]))
        state.apply(events)
    state.refresh_model()
    rows = float(np.mean([len(state.counts_of(f"rows300-{u}")) for u in range(200)]))
    out: dict[str, Any] = {}
    for name, users in (
        ("cold", [f"cold-{i}" for i in range(rounds)]),
        ("warm", [f"warm-{i % 200}" for i in range(rounds)]),
        ("rows300", [f"rows300-{i % 200}" for i in range(rounds)]),
    ):
        began = time.process_time()
        for uxid in users:
            state.slate(uxid, 10)
        out[f"{name}_us_per_slate"] = round((time.process_time() - began) / rounds * 1e6, 1)
    out["rows300_rows"] = round(rows, 1)
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
