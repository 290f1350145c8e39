"""One user's bandit evidence: sparse integer counts per entity the user touched.

A user's state is an int32 array of shape (n, 3) with rows (key, clicks, seen), sorted by key.
Keys are stable across catalog reloads: a movie is its movie id (> 0), a facet value (a genre, a
director, ...) is minus its facet id (< 0). The Beta posterior of an entity is
Beta(prior_alpha + clicks, prior_beta + seen): the original service's `alpha += r; beta += 1 - r`
with r = 1 for a click and r = 0 for an impression, kept as exact integers so that a recount
from the event log reproduces the state bit for bit.
"""

from __future__ import annotations

import numpy as np

KEY, CLICKS, SEEN = 0, 1, 2
DTYPE = np.dtype("<i4")


def empty() -> np.ndarray:
    return np.zeros((0, 3), dtype=DTYPE)


def bump(state: np.ndarray, keys: np.ndarray, clicks: np.ndarray, seen: np.ndarray) -> np.ndarray:
    """Add `clicks` and `seen` to the rows of `keys` (sorted, unique). Returns the updated state:
    the same array, updated in place, when every key is already there; a new array otherwise."""
    n = len(state)
    if n == 0:
        fresh = np.empty((len(keys), 3), dtype=DTYPE)
        fresh[:, KEY], fresh[:, CLICKS], fresh[:, SEEN] = keys, clicks, seen
        return fresh
    have = state[:, KEY]
    pos = np.searchsorted(have, keys)
    found = have[np.minimum(pos, n - 1)] == keys
    if found.all():
        state[pos, CLICKS] += clicks
        state[pos, SEEN] += seen
        return state
    # Merge: every row's place in the result is its own index plus the new keys before it.
    new = ~found
    out = np.empty((n + int(new.sum()), 3), dtype=DTYPE)
    new_at = pos[new] + np.arange(int(new.sum()))
    old_at = np.arange(n) + np.searchsorted(keys[new], have)
    out[old_at] = state
    out[new_at, KEY], out[new_at, CLICKS], out[new_at, SEEN] = keys[new], clicks[new], seen[new]
    hit = old_at[pos[found]]
    out[hit, CLICKS] += clicks[found]
    out[hit, SEEN] += seen[found]
    return out


def aggregate(keys: np.ndarray, clicks: np.ndarray, seen: np.ndarray) -> tuple[np.ndarray, ...]:
    """Sum duplicate keys: (unique sorted keys, clicks per key, seen per key)."""
    uniq, inverse = np.unique(keys, return_inverse=True)
    n = len(uniq)
    return (
        uniq.astype(DTYPE),
        np.bincount(inverse, weights=clicks, minlength=n).astype(DTYPE),
        np.bincount(inverse, weights=seen, minlength=n).astype(DTYPE),
    )


def to_bytes(state: np.ndarray) -> bytes:
    return np.ascontiguousarray(state, dtype=DTYPE).tobytes()


def from_bytes(raw: bytes) -> np.ndarray:
    return np.frombuffer(raw, dtype=DTYPE).reshape(-1, 3).copy()


def movies(state: np.ndarray) -> np.ndarray:
    """The rows of movies (positive keys); facets sort first, having negative keys."""
    return state[np.searchsorted(state[:, KEY], 0, side="right") :]


def facets(state: np.ndarray) -> np.ndarray:
    return state[: np.searchsorted(state[:, KEY], 0, side="left")]


def posterior(state: np.ndarray, key: int) -> tuple[int, int]:
    """The original service's Beta(alpha, beta) of one entity: it starts at (1, 1), and each event
    adds r to alpha and 1 - r to beta (r = 1 for a click, 0 for an impression)."""
    pos = int(np.searchsorted(state[:, KEY], key))
    if pos < len(state) and state[pos, KEY] == key:
        return 1 + int(state[pos, CLICKS]), 1 + int(state[pos, SEEN])
    return 1, 1
