"""Small numpy helpers shared by the policy and the shard state."""

from __future__ import annotations

import numpy as np


def ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s + n) for each (s, n), without a Python loop: the indices of
    several CSR rows at once."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    return np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(total)


def unique(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted unique values, each value's index into them): np.unique(values, return_inverse=True)
    by one sort, without np.unique's fixed cost (about 30 µs in numpy 2, more than the sort of a
    few hundred values it wraps; the policy and the event path call it per request)."""
    values = np.asarray(values)
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    first = _firsts(ordered)
    inverse = np.empty(len(ordered), dtype=np.intp)
    inverse[order] = np.cumsum(first) - 1
    return ordered[first], inverse


def sorted_set(values: np.ndarray) -> np.ndarray:
    """np.unique(values) (sorted, distinct) by one sort."""
    ordered = np.sort(values)
    distinct: np.ndarray = ordered[_firsts(ordered)]
    return distinct


def _firsts(ordered: np.ndarray) -> np.ndarray:
    """Where each run of equal values of a sorted array starts."""
    first = np.empty(len(ordered), dtype=bool)
    first[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
    return first
