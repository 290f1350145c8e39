from __future__ import annotations

import numpy as np
import pytest

from system.core import userstate
from system.core.catalog import Catalog
from system.core.catalog_file import SHIPPED, read_movies
from system.core.dedup import SeenIds
from system.core.events import CLICKED, SEEN, Event
from system.core.popularity import Popularity
from system.core.shard_state import DIGEST, SEEN_IDS, ShardState
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


def test_the_dedup_window_is_a_span_of_stream_time(state: ShardState) -> None:
    day = 24 * 3600
    assert state.dedup_window == day  # the default
    many = [Event("u", SEEN, (1,), event_id=f"e{i}") for i in range(5_000)]  # any number of ids
    assert state.apply(many, 1_000) == 5_000
    assert state.apply(many, 1_000 + day) == 0  # a retry a day later: still inside the window
    assert state.apply(many[:10], 1_001 + day) == 10  # a second past it: counts again
    assert len(SeenIds.from_bytes(state.users["u"][SEEN_IDS])) == 10  # the others left the window: forgotten
    # Other users have their own ids.
    assert state.apply([Event("v", SEEN, (1,), event_id="e0")], 1_000) == 1


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
    ours, theirs = state.take_popularity(), other.take_popularity()
    assert np.array_equal(ours.keys, theirs.keys) and np.array_equal(ours.clicks, theirs.clicks)
    assert ours.impressions.sum() == sum(len(e.movies) for e in events if e.kind == SEEN) + np.sum(
        [
            len(state.catalog.facets_of(int(state.catalog.movie_index([m])[0])))
            for e in events
            if e.kind == SEEN
            for m in e.movies
        ]
    )


def test_dirty_users_snapshot_and_reload(state: ShardState) -> None:
    state.apply([Event("a", CLICKED, (3,), "x"), Event("b", SEEN, (4, 5))])
    rows = {r[0]: r for r in state.take_dirty()}
    assert set(rows) == {"a", "b"} and state.dirty == set()
    assert rows["a"][1] == slot_of("a")
    fresh = ShardState(state.catalog)
    fresh.admit(["a", "b", "new"], [(uxid, counts, seen) for uxid, _, counts, seen in rows.values()])
    assert np.array_equal(fresh.counts_of("a"), state.counts_of("a"))
    assert len(fresh.counts_of("new")) == 0 and "new" in fresh.users and not fresh.dirty  # new: resident, empty
    assert fresh.apply([Event("a", CLICKED, (3,), "x")]) == 0  # the seen ids survive a reload


def test_catalog_switch_keeps_learned_state(state: ShardState) -> None:
    state.apply([Event("u", CLICKED, (2,)), Event("u", SEEN, (40,))])
    before = state.counts_of("u").copy()
    smaller = Catalog.from_movies([m for m in state.catalog.movies if m.id != 40])
    state.set_catalog(smaller)
    assert np.array_equal(state.counts_of("u"), before)
    assert 40 not in state.slate("u", 100)[0]


def test_admit_never_replaces_a_resident_user(state: ShardState) -> None:
    state.apply([Event("a", CLICKED, (3,))])
    older = state.take_dirty()
    state.apply([Event("a", CLICKED, (4,))])
    state.admit(["a"], [(uxid, counts, seen) for uxid, _, counts, seen in older])
    assert userstate.posterior(state.counts_of("a"), 4) == (2, 1)  # memory is newer than a checkpoint


def test_eviction_keeps_the_budget_the_dirty_and_the_recently_used() -> None:
    state = ShardState(Catalog.from_movies(list(read_movies(SMALL_CSV))), resident_users=3)
    state.apply([Event(u, CLICKED, (1,)) for u in "abcde"])
    assert state.evict() == 0 and len(state.users) == 5  # all dirty: not in PostgreSQL yet
    state.take_dirty()  # as a checkpoint does
    state.slate("a", 3)  # a is used again: now the most recent
    # Until the checkpoint is in PostgreSQL, its users stay: evicted, their next event would
    # load the older state.
    assert state.evict() == 0 and len(state.users) == 5
    state.saved()
    assert state.evict() == 2 and list(state.users) == ["d", "e", "a"] and state.evicted == 2
    assert state.missing(["a", "b", "z"]) == ["b", "z"]
    state.apply([Event("d", CLICKED, (2,))])  # dirty again
    state.admit(["x", "y"], [])
    assert state.evict() == 2 and list(state.users) == ["d", "x", "y"]  # e and a: the least recently used


def test_a_kept_digest_stays_the_digest_of_the_counts_through_every_kind_of_event() -> None:
    """A user whose state outgrew the policy's digest keeps it, and every apply updates it: it
    stays what summing the counts afresh gives (impressions and clicks, on movies new to the user
    or not, unknown movies, repeated event ids); a popularity push keeps it (it weighs trials
    by the catalog's prior click rates), a new catalog drops it (the next slate sums it again)."""
    catalog = Catalog.from_movies(list(read_movies(SHIPPED)))
    state = ShardState(catalog, rng=np.random.default_rng(0))
    rng = np.random.default_rng(1)
    ids = catalog.movie_ids.tolist()
    state.apply([Event("u", SEEN, tuple(rng.choice(ids, 10, replace=False).tolist())) for _ in range(40)])
    state.slate("u", 10)
    digest = state.users["u"][DIGEST]
    assert digest is not None and digest[0] == state.model.version

    def assert_current() -> None:
        kept, fresh = state.users["u"][DIGEST], state.model.digest(state.counts_of("u"))
        assert kept is not None and kept[0] == fresh[0]
        assert kept[1:3] == fresh[1:3]
        np.testing.assert_allclose(kept[3], fresh[3], rtol=1e-12)

    seen = state.counts_of("u")[:, userstate.KEY]
    old = [m for m in ids if m in set(seen.tolist())]
    new = [m for m in ids if m not in set(seen.tolist())]
    for events in (
        [Event("u", SEEN, tuple(old[:5]) + tuple(new[:5]))],  # impressions of movies touched and not
        [Event("u", CLICKED, (old[0],)), Event("u", CLICKED, (new[9],))],  # clicks, one without an impression
        [Event("u", SEEN, (new[20], 99_999_999)), Event("u", CLICKED, (99_999_999,))],  # unknown movies
        [Event("u", CLICKED, (old[1],), event_id="c1"), Event("u", CLICKED, (old[1],), event_id="c1")],  # a repeat
        [Event("u", SEEN, (new[30],)), Event("v", SEEN, (new[30],)), Event("u", CLICKED, (new[30],))],  # two users
    ):
        state.apply(events)
        assert_current()
    # Popularity pushes, even ones that move every movie's click rate: the digest stays good.
    keys = catalog.movie_ids.astype(np.int64)
    version = state.model.version
    state.set_popularity(Popularity(keys, np.full(len(keys), 50.0), np.full(len(keys), 1000.0)))
    assert state.model.version == version and state.users["u"][DIGEST] is not None
    state.apply([Event("u", SEEN, (new[41],))])
    assert_current()
    # Another catalog (the same movies, reloaded): summed afresh at the next slate.
    state.set_catalog(Catalog.from_movies(list(read_movies(SHIPPED))))
    assert state.model.version != version
    state.apply([Event("u", SEEN, (new[40],))])
    assert state.users["u"][DIGEST] is None  # summed under the old catalog: dropped, not patched
    state.slate("u", 10)
    assert_current()


def test_erasing_a_user_takes_all_they_added_out_of_popularity(state: ShardState) -> None:
    """Checkpointed part out of `known` (PostgreSQL drops it in the same erase), the part since
    out of `pending`: the next checkpoint adds only what the other users did."""
    state.apply([Event("keep", CLICKED, (3,)), Event("gone", CLICKED, (3,)), Event("gone", SEEN, (4, 5))])
    saved = {uxid: counts for uxid, _, counts, _ in state.take_dirty()}
    state.set_popularity(Popularity.total([state.take_popularity()]))  # as PostgreSQL holds it now
    state.apply([Event("keep", SEEN, (4,)), Event("gone", CLICKED, (4,))])  # not checkpointed yet
    assert state.erase("gone", userstate.from_bytes(saved["gone"])) is True
    assert "gone" not in state.users and "gone" not in state.dirty
    known, delta = state.known, state.take_popularity()
    total = Popularity.total([known, delta])
    expected = Popularity.of_user(state.counts_of("keep"))
    nonzero = (total.clicks != 0) | (total.impressions != 0)
    assert np.array_equal(total.keys[nonzero], expected.keys)
    assert np.array_equal(total.clicks[nonzero], expected.clicks)
    assert np.array_equal(total.impressions[nonzero], expected.impressions)
    assert state.erase("never-seen", None) is False
    assert len(state.counts_of("gone")) == 0  # the id names a new user
