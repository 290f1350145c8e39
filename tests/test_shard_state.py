from __future__ import annotations

import numpy as np
import pytest

from system.core import userstate
from system.core.catalog import Catalog
from system.core.catalog_file import read_movies
from system.core.events import CLICKED, DEDUP_WINDOW, SEEN, Event
from system.core.shard_state import ShardState
from system.core.sharding import slot_of
from tests.conftest import SMALL_CSV


@pytest.fixture
def state() -> ShardState:
    return ShardState(Catalog.from_movies(list(read_movies(SMALL_CSV))), rng=np.random.default_rng(0))


def test_a_repeated_event_id_counts_once(state: ShardState) -> None:
    e = Event("u", CLICKED, (2,), event_id="click-1")
    assert state.apply([e, e]) == 1
    assert state.apply([e]) == 0
    assert userstate.posterior(state.counts_of("u"), 2) == (2, 1)
    assert state.duplicates == 2


def test_the_dedup_window_is_the_users_last_events(state: ShardState) -> None:
    first = Event("u", SEEN, (1,), event_id="e0")
    state.apply([first] + [Event("u", SEEN, (1,), event_id=f"e{i}") for i in range(1, DEDUP_WINDOW)])
    assert state.apply([first]) == 0  # still inside the window
    state.apply([Event("u", SEEN, (1,), event_id="one-more")])
    assert state.apply([first]) == 1  # pushed out of the window: counts again
    assert len(state.users["u"].recent) == DEDUP_WINDOW
    # Other users have their own window.
    assert state.apply([Event("v", SEEN, (1,), event_id="e0")]) == 1


def test_unknown_movies_are_ignored_and_counted(state: ShardState) -> None:
    assert state.apply([Event("u", SEEN, (9999,)), Event("u", SEEN, (1, 9998))]) == 1
    assert state.unknown_movies == 2
    assert userstate.posterior(state.counts_of("u"), 1) == (1, 2)
    assert userstate.posterior(state.counts_of("u"), 9998) == (1, 1)


def test_batch_apply_equals_one_by_one(state: ShardState) -> None:
    rng = np.random.default_rng(5)
    events = [
        Event(
            f"u{rng.integers(5)}",
            int(rng.integers(2)),
            tuple(int(m) for m in rng.choice(np.arange(1, 41), rng.integers(1, 5), replace=False)),
        )
        for _ in range(300)
    ]
    other = ShardState(state.catalog, rng=np.random.default_rng(0))
    state.apply(events)
    for e in events:
        other.apply([e])
    for uxid in other.users:
        assert np.array_equal(state.counts_of(uxid), other.counts_of(uxid))
    assert np.array_equal(state.local_clicks, other.local_clicks) and np.array_equal(state.local_seen, other.local_seen)


def test_dirty_users_snapshot_and_reload(state: ShardState) -> None:
    state.apply([Event("a", CLICKED, (3,), "x"), Event("b", SEEN, (4, 5))])
    rows = {r[0]: r for r in state.take_dirty()}
    assert set(rows) == {"a", "b"} and state.dirty == set()
    assert rows["a"][1] == slot_of("a")
    fresh = ShardState(state.catalog)
    for uxid, _, counts, recent in rows.values():
        fresh.load_user(uxid, counts, recent)
    assert np.array_equal(fresh.counts_of("a"), state.counts_of("a"))
    assert np.array_equal(fresh.local_clicks, state.local_clicks)
    assert fresh.apply([Event("a", CLICKED, (3,), "x")]) == 0  # the dedup window survives a reload


def test_catalog_switch_keeps_learned_state(state: ShardState) -> None:
    state.apply([Event("u", CLICKED, (2,)), Event("u", SEEN, (40,))])
    before = state.counts_of("u").copy()
    smaller = Catalog.from_movies([m for m in state.catalog.movies if m.id != 40])
    state.set_catalog(smaller)
    assert np.array_equal(state.counts_of("u"), before)
    assert 40 not in state.slate("u", 100)[0]
