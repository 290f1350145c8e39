from __future__ import annotations

import numpy as np

from system import userstate as us


def arr(*values: int) -> np.ndarray:
    return np.array(values, dtype=us.DTYPE)


def test_bump_inserts_sorted_and_adds_in_place() -> None:
    s = us.empty()
    s = us.bump(s, arr(-3, 5), arr(0, 1), arr(1, 0))
    assert s.tolist() == [[-3, 0, 1], [5, 1, 0]]
    same = us.bump(s, arr(5), arr(2), arr(3))
    assert same is s  # every key present: updated in place
    assert s.tolist() == [[-3, 0, 1], [5, 3, 3]]
    s = us.bump(s, arr(-7, -3, 2), arr(1, 1, 0), arr(0, 1, 1))
    assert s.tolist() == [[-7, 1, 0], [-3, 1, 2], [2, 0, 1], [5, 3, 3]]


def test_aggregate_sums_duplicates() -> None:
    keys, clicks, seen = us.aggregate(arr(4, -1, 4, 4), np.array([1, 0, 0, 1]), np.array([0, 1, 1, 1]))
    assert keys.tolist() == [-1, 4] and clicks.tolist() == [0, 2] and seen.tolist() == [1, 2]


def test_bytes_round_trip_and_split() -> None:
    s = us.bump(us.empty(), arr(-9, -2, 7, 11), arr(1, 2, 3, 4), arr(5, 6, 7, 8))
    back = us.from_bytes(us.to_bytes(s))
    assert np.array_equal(back, s) and back.flags.writeable
    assert us.movies(s)[:, us.KEY].tolist() == [7, 11]
    assert us.facets(s)[:, us.KEY].tolist() == [-9, -2]


def test_bump_matches_a_dictionary_on_random_updates() -> None:
    rng = np.random.default_rng(0)
    for _ in range(500):
        reference: dict[int, list[int]] = {}
        state = us.empty()
        for _ in range(6):
            keys = np.unique(rng.integers(-20, 40, rng.integers(1, 12))).astype(us.DTYPE)
            clicks = rng.integers(0, 3, len(keys)).astype(us.DTYPE)
            seen = rng.integers(0, 3, len(keys)).astype(us.DTYPE)
            state = us.bump(state, keys, clicks, seen)
            for k, c, s in zip(keys.tolist(), clicks.tolist(), seen.tolist(), strict=True):
                row = reference.setdefault(k, [0, 0])
                row[0] += c
                row[1] += s
            assert state.tolist() == [[k, *reference[k]] for k in sorted(reference)]
