"""One user's bandit evidence: sparse integer counts per entity the user touched.

A user's state is an int32 array of shape (n, 4) with rows (key, clicks, seen, since), sorted by
key. Keys are stable across catalog reloads: a movie is its movie id (> 0), a facet value (a
genre, a director, ...) is minus its facet id (< 0). The Beta posterior of an entity is
Beta(prior_alpha + clicks, prior_beta + seen): the original service's `alpha += r; beta += 1 - r`
with r = 1 for a click and r = 0 for an impression. `since` counts the entity's impressions
after its last click: the recency the policy discounts old clicks by, when tastes shift. All
exact integers, and a batch of events changes them as the same events one by one would, so a
recount from the event log reproduces the state bit for bit however the events were batched.
"""

from __future__ import annotations

import numpy as np

from system.core.arrays import unique

# Columns. IMPRESSIONS counts `seen` events; SINCE_CLICK the impressions after the last click.
KEY, CLICKS, IMPRESSIONS, SINCE_CLICK = 0, 1, 2, 3
WIDTH = 4
DTYPE = np.dtype("<i4")


def empty() -> np.ndarray:
    return np.zeros((0, WIDTH), dtype=DTYPE)


def bump(state: np.ndarray, keys: np.ndarray, clicks: np.ndarray, seen: np.ndarray, since: np.ndarray) -> np.ndarray:
    """Add a batch's summary (see `aggregate`) to the rows of `keys` (sorted, unique): `clicks`
    and `seen` add up; `since` replaces a row's count where the batch clicked it, else adds up.
    Returns the updated state: the same array, updated in place, when every key is already
    there; a new array otherwise."""
    n = len(state)
    if n == 0:
        fresh = np.empty((len(keys), WIDTH), dtype=DTYPE)
        fresh[:, KEY], fresh[:, CLICKS], fresh[:, IMPRESSIONS], fresh[:, SINCE_CLICK] = keys, clicks, seen, since
        return fresh
    have = state[:, KEY]
    pos = np.searchsorted(have, keys)
    found = have[np.minimum(pos, n - 1)] == keys
    if found.all():
        _add(state, pos, clicks, seen, since)
        return state
    # Merge: every row's place in the result is its own index plus the new keys before it.
    new = ~found
    out = np.empty((n + int(new.sum()), WIDTH), dtype=DTYPE)
    new_at = pos[new] + np.arange(int(new.sum()))
    old_at = np.arange(n) + np.searchsorted(keys[new], have)
    out[old_at] = state
    out[new_at, KEY], out[new_at, CLICKS], out[new_at, IMPRESSIONS], out[new_at, SINCE_CLICK] = (
        keys[new], clicks[new], seen[new], since[new]
    )  # fmt: skip
    _add(out, old_at[pos[found]], clicks[found], seen[found], since[found])
    return out


_OFFSET = 2**31  # keys are int32: shifted into 32 unsigned bits, under the user's index


def pack(users: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """(user index, key) pairs as one int64 each, sorting by user, then key."""
    return (np.asarray(users, dtype=np.int64) << 32) | (np.asarray(keys, dtype=np.int64) + _OFFSET)


def unpack(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(user indices, keys) of `pack`ed pairs."""
    return packed >> 32, ((packed & 0xFFFFFFFF) - _OFFSET).astype(DTYPE)


def bump_many(
    states: list[np.ndarray], users: np.ndarray, keys: np.ndarray, clicks: np.ndarray, seen: np.ndarray,
    since: np.ndarray,
) -> list[np.ndarray]:  # fmt: skip
    """`bump` for many users at once: `states[u]` takes the rows of user u, the rows sorted by
    (user, key) and unique (see `aggregate`). One merge of every state with every row, instead
    of a dozen numpy calls per user: the event path touches hundreds of users per span. Returns
    each user's new state (its own array: no user holds a view into another's)."""
    n = len(states)
    sizes = np.fromiter(map(len, states), dtype=np.int64, count=n)
    old = np.concatenate(states) if sizes.sum() else empty()
    old_packed = pack(np.repeat(np.arange(n), sizes), old[:, KEY])
    new_packed = pack(users, keys)
    pos = np.searchsorted(old_packed, new_packed)
    found = old_packed[np.minimum(pos, len(old_packed) - 1)] == new_packed if len(old_packed) else pos < 0
    _add(old, pos[found], clicks[found], seen[found], since[found])
    new = ~found
    added = int(new.sum())
    out = np.empty((len(old) + added, WIDTH), dtype=DTYPE)
    out[np.arange(len(old)) + np.searchsorted(new_packed[new], old_packed)] = old
    new_at = pos[new] + np.arange(added)
    out[new_at, KEY], out[new_at, CLICKS], out[new_at, IMPRESSIONS], out[new_at, SINCE_CLICK] = (
        keys[new], clicks[new], seen[new], since[new]
    )  # fmt: skip
    bounds = np.concatenate([[0], np.cumsum(sizes + np.bincount(users[new], minlength=n))]).tolist()
    return [out[a:b].copy() for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _add(state: np.ndarray, rows: np.ndarray, clicks: np.ndarray, seen: np.ndarray, since: np.ndarray) -> None:
    state[rows, CLICKS] += clicks
    state[rows, IMPRESSIONS] += seen
    state[rows, SINCE_CLICK] = np.where(clicks > 0, since, state[rows, SINCE_CLICK] + since)


def aggregate(
    keys: np.ndarray, clicks: np.ndarray, seen: np.ndarray, order: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Summarize a batch of (key, clicks, seen) rows, in event order (or ordered by `order`):
    (unique sorted keys, clicks per key, seen per key, impressions per key after its last click
    in the batch). Keys keep their dtype (callers pack more into them); counts are DTYPE."""
    uniq, inverse = unique(keys)
    n = len(uniq)
    order = np.arange(len(keys)) if order is None else np.asarray(order)
    clicked = np.asarray(clicks) > 0
    last_click = np.full(n, -1, dtype=np.int64)
    np.maximum.at(last_click, inverse[clicked], order[clicked])
    after = order > last_click[inverse]
    return (
        uniq,
        np.bincount(inverse, weights=clicks, minlength=n).astype(DTYPE),
        np.bincount(inverse, weights=seen, minlength=n).astype(DTYPE),
        np.bincount(inverse, weights=np.where(after, seen, 0), minlength=n).astype(DTYPE),
    )


def to_bytes(state: np.ndarray) -> bytes:
    return np.ascontiguousarray(state, dtype=DTYPE).tobytes()


def from_bytes(raw: bytes) -> np.ndarray:
    return np.frombuffer(raw, dtype=DTYPE).reshape(-1, WIDTH).copy()


def movies(state: np.ndarray) -> np.ndarray:
    """The rows of movies (positive keys); facets sort first, having negative keys."""
    return state[np.searchsorted(state[:, KEY], 0, side="right") :]


def facets(state: np.ndarray) -> np.ndarray:
    return state[: np.searchsorted(state[:, KEY], 0, side="left")]


def rows_of(state: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """The rows of `keys` (sorted), a row of zeros but the key where the state has none."""
    out = np.zeros((len(keys), WIDTH), dtype=DTYPE)
    out[:, KEY] = keys
    if len(state):
        pos = np.minimum(np.searchsorted(state[:, KEY], keys), len(state) - 1)
        found = state[pos, KEY] == keys
        out[found] = state[pos[found]]
    return out


def posterior(state: np.ndarray, key: int) -> tuple[int, int]:
    """The original service's Beta(alpha, beta) of one entity: it starts at (1, 1), and each event
    adds r to alpha and 1 - r to beta (r = 1 for a click, 0 for an impression)."""
    row = rows_of(state, np.array([key]))[0]
    return 1 + int(row[CLICKS]), 1 + int(row[IMPRESSIONS])
