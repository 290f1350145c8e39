"""The shards' arithmetic (numpy, batched) against the reference recount (plain Python, one
event at a time), on event sequences hypothesis makes up: any events, any stream times, any
batching; with a short de-duplication window and a small cap on ids, so both come into play."""

from __future__ import annotations

from itertools import accumulate

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from system.core.catalog import Catalog
from system.core.catalog_file import read_movies
from system.core.dedup import SeenIds
from system.core.events import CLICKED, SEEN, Event
from system.core.recount import recount
from system.core.shard_state import COUNTS, SEEN_IDS, ShardState
from tests.conftest import SMALL_CSV

CATALOG = Catalog.from_movies(list(read_movies(SMALL_CSV)))  # movies 1..40, genres and directors
FACETS = CATALOG.facet_ids_by_movie()
WINDOW, CAP = 5, 3  # seconds, ids per user

events = st.builds(
    Event,
    user=st.sampled_from(["ann", "bo", "cy"]),
    kind=st.sampled_from([SEEN, CLICKED]),
    movies=st.lists(st.integers(1, 44), min_size=1, max_size=4).map(tuple),  # 41..44: not in the catalog
    event_id=st.one_of(st.none(), st.integers(0, 8).map(lambda i: f"e{i}")),  # repeats, near and far
)


def _ids(seen: bytes) -> tuple[list[int], list[int]]:
    ids = SeenIds.from_bytes(seen)
    return list(ids.ids), list(ids.at)


def shard_state(
    batches: list[list[tuple[int, Event]]],
) -> dict[str, tuple[list[tuple[int, ...]], tuple[list[int], list[int]]]]:
    state = ShardState(CATALOG, rng=np.random.default_rng(0), dedup_window=WINDOW, dedup_max_ids=CAP)
    for batch in batches:
        state.apply([e for _, e in batch], [t for t, _ in batch])
    return {u: ([tuple(r) for r in user[COUNTS].tolist()], _ids(user[SEEN_IDS])) for u, user in state.users.items()}


@settings(max_examples=300, deadline=None)
@given(
    st.lists(events, max_size=80),
    st.lists(st.sampled_from([0, 0, 0, 0, 1, 2, 6]), min_size=80, max_size=80),  # seconds between events
    st.lists(st.integers(0, 80), max_size=6),  # where batches are cut
)
def test_batched_shard_arithmetic_equals_the_reference_recount(
    sequence: list[Event], gaps: list[int], cuts: list[int]
) -> None:
    seconds = list(accumulate(gaps))[: len(sequence)]
    timed = list(zip(seconds, sequence, strict=True))
    bounds = [0, *sorted(c for c in cuts if c < len(timed)), len(timed)]
    batches = [timed[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    log = [(seq, t, [event]) for seq, (t, event) in enumerate(timed, start=1)]
    reference = recount(log, FACETS, window=WINDOW, cap=CAP)
    assert shard_state(batches) == {u: (r.rows(), r.seen_ids()) for u, r in reference.items()}


def test_the_reference_follows_the_contract_by_hand() -> None:
    """Movie 2 (The Godfather: Crime, Drama; Coppola) seen twice, clicked, seen again; a repeat
    of an event id; an event whose only movie is unknown."""
    godfather = FACETS[2]
    log = [
        (1, 0, [Event("u", SEEN, (2,), "a")]),
        (2, 0, [Event("u", SEEN, (2,), "b")]),
        (3, 0, [Event("u", CLICKED, (2,), "c"), Event("u", CLICKED, (2,), "c")]),  # the repeat counts once
        (4, 0, [Event("u", SEEN, (2, 999), "d")]),  # 999 is unknown: ignored, the rest counts
        (5, 0, [Event("v", SEEN, (999,), "e")]),  # nothing known: nothing, not even user v
    ]
    users = recount(log, FACETS, window=60, cap=100)
    assert set(users) == {"u"}
    rows = {key: rest for key, *rest in users["u"].rows()}
    assert rows[2] == [1, 3, 1]  # clicks, impressions, impressions since the last click
    assert all(rows[-f] == [1, 3, 1] for f in godfather) and len(rows) == 1 + len(godfather)
    assert len(users["u"].seen) == 4
    assert recount(log, FACETS, window=60, cap=100, cutoff=lambda user: 2)["u"].rows()[-1] == (2, 0, 2, 2)


def test_a_repeat_counts_once_within_the_window_and_again_after_it() -> None:
    def clicks(seconds: list[int], window: int = 10, cap: int = 100) -> int:
        log = [(i, t, [Event("u", CLICKED, (1,), "same")]) for i, t in enumerate(seconds, start=1)]
        return recount(log, FACETS, window=window, cap=cap)["u"].rows()[-1][1]

    assert clicks([0, 5, 10]) == 1  # 10 s after it: still within the window
    assert clicks([0, 11]) == 2  # past it: counts again
    assert clicks([0, 11, 15]) == 2  # ... and from then on the window starts over

    def ids_kept(n: int, cap: int) -> int:
        log = [(i, 0, [Event("u", SEEN, (1,), f"e{i}")]) for i in range(n)]
        return len(recount(log, FACETS, window=60, cap=cap)["u"].seen)

    assert ids_kept(10, cap=4) == 4


def test_an_id_exactly_a_window_old_is_still_kept_by_both() -> None:
    log = [(1, 0, [Event("u", SEEN, (1,), "a")]), (2, 5, [Event("u", SEEN, (1,), "b")])]
    reference = recount(log, FACETS, window=5, cap=10)["u"].seen_ids()
    state = ShardState(CATALOG, dedup_window=5, dedup_max_ids=10)
    state.apply([e for _, _, [e] in log], [t for _, t, _ in log])
    seen = SeenIds.from_bytes(state.users["u"][SEEN_IDS])
    assert (list(seen.ids), list(seen.at)) == reference
    assert reference[1] == [0, 5]
