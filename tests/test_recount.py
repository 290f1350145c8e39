"""The shards' arithmetic (numpy, batched) against the reference recount (plain Python, one
event at a time), on event sequences hypothesis makes up: any events, any batching."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from system.core.catalog import Catalog
from system.core.catalog_file import read_movies
from system.core.events import CLICKED, DEDUP_WINDOW, SEEN, Event
from system.core.recount import recount
from system.core.shard_state import ShardState
from tests.conftest import SMALL_CSV

CATALOG = Catalog.from_movies(list(read_movies(SMALL_CSV)))  # movies 1..40, genres and directors
FACETS = CATALOG.facet_ids_by_movie()

events = st.builds(
    Event,
    user=st.sampled_from(["ann", "bo", "cy"]),
    kind=st.sampled_from([SEEN, CLICKED]),
    movies=st.lists(st.integers(1, 44), min_size=1, max_size=4).map(tuple),  # 41..44: not in the catalog
    event_id=st.one_of(st.none(), st.integers(0, DEDUP_WINDOW + 8).map(lambda i: f"e{i}")),  # repeats, some old
)


def shard_state(batches: list[list[Event]]) -> dict[str, tuple[list[tuple[int, ...]], list[int]]]:
    state = ShardState(CATALOG, rng=np.random.default_rng(0))
    for batch in batches:
        state.apply(batch)
    return {u: ([tuple(r) for r in x.counts.tolist()], list(x.recent)) for u, x in state.users.items()}


@settings(max_examples=300, deadline=None)
@given(st.lists(events, max_size=80), st.lists(st.integers(0, 80), max_size=6))
def test_batched_shard_arithmetic_equals_the_reference_recount(sequence: list[Event], cuts: list[int]) -> None:
    bounds = [0, *sorted(c for c in cuts if c < len(sequence)), len(sequence)]
    batches = [sequence[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    reference = recount([(seq, [event]) for seq, event in enumerate(sequence, start=1)], FACETS)
    assert shard_state(batches) == {u: (r.rows(), r.recent) for u, r in reference.items()}


def test_the_reference_follows_the_contract_by_hand() -> None:
    """Movie 2 (The Godfather: Crime, Drama; Coppola) seen twice, clicked, seen again; a repeat
    of an event id; an event whose only movie is unknown."""
    godfather = FACETS[2]
    log = [
        (1, [Event("u", SEEN, (2,), "a")]),
        (2, [Event("u", SEEN, (2,), "b")]),
        (3, [Event("u", CLICKED, (2,), "c"), Event("u", CLICKED, (2,), "c")]),  # the repeat counts once
        (4, [Event("u", SEEN, (2, 999), "d")]),  # 999 is unknown: ignored, the rest counts
        (5, [Event("v", SEEN, (999,), "e")]),  # nothing known: nothing, not even user v
    ]
    users = recount(log, FACETS)
    assert set(users) == {"u"}
    rows = dict((key, rest) for key, *rest in users["u"].rows())
    assert rows[2] == [1, 3, 1]  # clicks, impressions, impressions since the last click
    assert all(rows[-f] == [1, 3, 1] for f in godfather) and len(rows) == 1 + len(godfather)
    assert len(users["u"].recent) == 4
    assert recount(log, FACETS, cutoff=lambda user: 2)["u"].rows()[-1] == (2, 0, 2, 2)


@pytest.mark.parametrize("window", [DEDUP_WINDOW])
def test_an_id_pushed_out_of_the_window_counts_again(window: int) -> None:
    log = [(i, [Event("u", SEEN, (1,), f"e{i}")]) for i in range(window + 1)] + [(99, [Event("u", SEEN, (1,), "e0")])]
    assert recount(log, FACETS)["u"].rows()[-1][2] == window + 2
