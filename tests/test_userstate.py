from __future__ import annotations

import numpy as np

from system.core import userstate as us


def arr(*values: int) -> np.ndarray:
    return np.array(values, dtype=us.DTYPE)


def test_bump_inserts_sorted_and_adds_in_place() -> None:
    s = us.empty()
    s = us.bump(s, arr(-3, 5), arr(0, 1), arr(1, 0), arr(1, 0))
    assert s.tolist() == [[-3, 0, 1, 1], [5, 1, 0, 0]]
    same = us.bump(s, arr(5), arr(2), arr(3), arr(1))
    assert same is s  # every key present: updated in place
    assert s.tolist() == [[-3, 0, 1, 1], [5, 3, 3, 1]]
    s = us.bump(s, arr(-7, -3, 2), arr(1, 1, 0), arr(0, 1, 1), arr(0, 0, 1))
    assert s.tolist() == [[-7, 1, 0, 0], [-3, 1, 2, 0], [2, 0, 1, 1], [5, 3, 3, 1]]
    s = us.bump(s, arr(-3, 5), arr(0, 0), arr(2, 4), arr(2, 4))  # no click: `since` adds up
    assert s.tolist() == [[-7, 1, 0, 0], [-3, 1, 4, 2], [2, 0, 1, 1], [5, 3, 7, 5]]


def test_aggregate_sums_duplicates_and_counts_impressions_after_the_last_click() -> None:
    #                                  seen  click seen  seen  click  seen
    keys, clicks, seen, since = us.aggregate(
        arr(4, -1, 4, 4, 4, -1), np.array([0, 1, 0, 0, 1, 0]), np.array([1, 0, 1, 1, 0, 1])
    )
    assert keys.tolist() == [-1, 4] and clicks.tolist() == [1, 1] and seen.tolist() == [1, 3]
    assert since.tolist() == [1, 0]  # -1: one impression after its click; 4: its click came last
    # `order` says which row came first, whatever their places in the arrays.
    _, _, _, since = us.aggregate(arr(4, 4), np.array([0, 1]), np.array([1, 0]), order=np.array([1, 0]))
    assert since.tolist() == [1]


def test_bytes_round_trip_and_split() -> None:
    s = us.bump(us.empty(), arr(-9, -2, 7, 11), arr(1, 2, 3, 4), arr(5, 6, 7, 8), arr(0, 1, 2, 3))
    back = us.from_bytes(us.to_bytes(s))
    assert np.array_equal(back, s) and back.flags.writeable
    assert us.movies(s)[:, us.KEY].tolist() == [7, 11]
    assert us.facets(s)[:, us.KEY].tolist() == [-9, -2]


def test_any_batching_of_the_same_events_gives_the_same_state() -> None:
    """What a recount relies on: events applied one by one, or in batches cut anywhere, give
    the same rows as a plain per-key reference (clicks, impressions, impressions since a click)."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(1, 40))
        keys = rng.integers(-6, 12, n).astype(us.DTYPE)
        is_click = rng.random(n) < 0.3
        reference: dict[int, list[int]] = {}
        for k, c in zip(keys.tolist(), is_click.tolist(), strict=True):
            row = reference.setdefault(k, [0, 0, 0])
            row[0] += c
            row[1] += not c
            row[2] = 0 if c else row[2] + 1
        expected = [[k, *reference[k]] for k in sorted(reference)]
        cuts = np.sort(rng.choice(np.arange(1, n), size=min(n - 1, int(rng.integers(0, 5))), replace=False))
        state = us.empty()
        for part in np.split(np.arange(n), cuts):
            state = us.bump(state, *us.aggregate(keys[part], is_click[part].astype(int), (~is_click[part]).astype(int)))
        assert state.tolist() == expected
