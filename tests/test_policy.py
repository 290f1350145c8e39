"""The bandit policy and its arithmetic, with fixed seeds, on the shipped catalog and a small one."""

from __future__ import annotations

from collections import Counter
from functools import cache

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from system.core import policy, userstate
from system.core.arrays import sorted_set, unique
from system.core.catalog import Catalog
from system.core.catalog_file import SHIPPED, read_movies
from system.core.events import CLICKED, SEEN, Event
from system.core.policy_config import PolicyConfig
from system.core.shard_state import DIGEST, ShardState
from tests.conftest import SMALL_CSV


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return Catalog.from_movies(list(read_movies(SHIPPED)))


@cache
def facet_names(catalog: Catalog) -> dict[int, set[str]]:
    """Each movie's facet values by name."""
    return {int(m): {catalog.facets[j].name for j in catalog.facets_of(i)} for i, m in enumerate(catalog.movie_ids)}


@pytest.fixture(scope="module")
def small() -> Catalog:
    return Catalog.from_movies(list(read_movies(SMALL_CSV)))


def facet_key(catalog: Catalog, kind: str, name: str) -> int:
    return -next(f.id for f in catalog.facets if f.kind == kind and f.name == name)


def genres(catalog: Catalog, movie_ids: list[int]) -> list[set[str]]:
    idx = catalog.movie_index(movie_ids)
    return [{f.name for f in catalog.facet_names(int(i)).get("genres", [])} for i in idx]


def test_update_arithmetic_is_the_original_beta_update(small: Catalog) -> None:
    state = ShardState(small, rng=np.random.default_rng(0))
    state.apply([Event("u", SEEN, (2, 3)), Event("u", SEEN, (2,)), Event("u", CLICKED, (2,)), Event("u", SEEN, (2,))])
    counts = state.counts_of("u")
    # movie 2 (The Godfather: Crime, Drama; Coppola): 3 impressions, 1 click.
    assert userstate.posterior(counts, 2) == (1 + 1, 1 + 3)
    assert userstate.posterior(counts, 3) == (1, 1 + 1)
    assert userstate.posterior(counts, facet_key(small, "genres", "Crime")) == (1 + 1, 1 + 3 + 1)
    assert userstate.posterior(counts, facet_key(small, "genres", "Action")) == (1, 1 + 1)  # only movie 3
    assert userstate.posterior(counts, facet_key(small, "directors", "Francis Ford Coppola")) == (2, 4)
    assert userstate.posterior(counts, facet_key(small, "directors", "Christopher Nolan")) == (1, 2)
    assert userstate.posterior(counts, 1) == (1, 1)  # untouched: the prior
    # Everything the user touched is in the sparse state, nothing else.
    assert len(counts) == 2 + 3 + 2  # movies 2, 3; Crime, Drama, Action; two directors
    assert state.take_popularity().clicks.sum() == 4  # one click: movie 2 and its three facet values
    assert state.applied == 4


def test_cold_user_slate_is_full_distinct_and_diverse(catalog: Catalog) -> None:
    model = policy.Model(catalog)
    cold = model.view(userstate.empty())
    for seed in range(20):
        slate = policy.draw_slate(model, cold, 10, np.random.default_rng(seed))
        ids = catalog.movie_ids[slate.movies].tolist()
        assert len(ids) == 10 and len(set(ids)) == 10
        counts = Counter(g for gs in genres(catalog, ids) for g in gs)
        assert counts.most_common(1)[0][1] < 10, "ten copies of one genre"
        assert len(counts) >= 4


def test_cold_slates_favor_well_rated_popular_movies(catalog: Catalog) -> None:
    model = policy.Model(catalog)
    cold = model.view(userstate.empty())
    picked = np.concatenate([policy.draw_slate(model, cold, 10, np.random.default_rng(s)).movies for s in range(30)])
    assert np.nanmean(catalog.rating[picked]) > np.nanmean(catalog.rating) + 0.5
    assert np.median(catalog.votes[picked]) > 2 * np.median(catalog.votes)
    # But not the same ten for everyone: each slate is a draw, not a fixed ranking (how many more
    # movies with more exploration: the next test).
    assert len(set(picked.tolist())) > 10


def test_exploration_widens_the_draws_and_keeps_their_mean(catalog: Catalog) -> None:
    """Low exploration: the same few top movies for every cold user; high: many more movies,
    still better rated than the catalog on average."""
    picked = {}
    for e in (0.05, 1.0, 4.0):
        model = policy.Model(catalog, PolicyConfig(exploration=e))
        cold = model.view(userstate.empty())
        picked[e] = np.concatenate(
            [policy.draw_slate(model, cold, 10, np.random.default_rng(s)).movies for s in range(30)]
        )
    distinct = {e: len(set(p.tolist())) for e, p in picked.items()}
    assert distinct[0.05] < distinct[1.0] < distinct[4.0], distinct
    assert np.nanmean(catalog.rating[picked[4.0]]) > np.nanmean(catalog.rating), "exploring, not random"


def test_same_seed_same_slate(catalog: Catalog) -> None:
    model = policy.Model(catalog)
    view = model.view(userstate.empty())
    a = policy.draw_slate(model, view, 10, np.random.default_rng(7)).movies
    b = policy.draw_slate(model, view, 10, np.random.default_rng(7)).movies
    c = policy.draw_slate(model, view, 10, np.random.default_rng(8)).movies
    assert a.tolist() == b.tolist() and a.tolist() != c.tolist()


def genre_movies(catalog: Catalog, name: str) -> set[int]:
    return {int(m) for m in catalog.movies_of(int(np.flatnonzero([f.name == name for f in catalog.facets])[0]))}


def fan_shares(
    catalog: Catalog, seed: int, tastes: list[str], config: PolicyConfig | None = None, learn: bool = True
) -> list[float]:
    """A user who, in round r, clicks only movies of genre tastes[r]: each round a slate of 10,
    and a click on the first such movie of it with probability 1/2 (a cascade: at most one click
    per slate). Returns, per round, the share of the slate in that round's genre. With `learn`
    off the events are never applied: the baseline of a policy that does not learn."""
    rng = np.random.default_rng(seed)
    state = ShardState(catalog, config, rng=rng)
    members = {name: genre_movies(catalog, name) for name in set(tastes)}
    shares = []
    for taste in tastes:
        ids, _ = state.slate("fan", 10)
        liked = [int(i) in members[taste] for i in catalog.movie_index(ids)]
        shares.append(float(np.mean(liked)))
        events = [Event("fan", SEEN, tuple(ids))]
        first = next((m for m, c in zip(ids, liked, strict=False) if c), None)
        if first is not None and rng.random() < 0.5:
            events.append(Event("fan", CLICKED, (first,)))
        if learn:
            state.apply(events)
    return shares


def test_crime_fan_gets_a_majority_of_crime_within_a_few_dozen_rounds(catalog: Catalog) -> None:
    # A dozen users: with fewer, the spread of Thompson draws weighs more than what was learned.
    late = np.array([np.mean(fan_shares(catalog, seed, ["Crime"] * 40)[25:]) for seed in range(12)])
    unlearned = np.array([np.mean(fan_shares(catalog, seed, ["Crime"] * 40, learn=False)[25:]) for seed in range(12)])
    assert late.mean() > 0.5, late  # a majority of each slate, after 25 rounds
    # ... and far above what the same slates hold when nothing is learned (about the catalog's share).
    standard_error = np.sqrt(late.var(ddof=1) / len(late) + unlearned.var(ddof=1) / len(unlearned))
    assert late.mean() - unlearned.mean() > 3 * standard_error, (late, unlearned)


def test_old_clicks_fade_as_the_user_passes_up_what_they_used_to_click(catalog: Catalog) -> None:
    """20 Crime clicks, then 80 impressions of Crime movies without a click and 3 Comedy clicks:
    with forget_half_life, Crime's sampled preference falls and Comedy overtakes it; a taste
    the user still acts on (no impressions since the clicks) is left exactly as it was."""
    crime = sorted(genre_movies(catalog, "Crime") - genre_movies(catalog, "Comedy"))
    comedy = sorted(genre_movies(catalog, "Comedy") - genre_movies(catalog, "Crime"))
    ids = catalog.movie_ids
    clicks = [Event("u", CLICKED, (int(ids[m]),)) for m in crime[:20]]
    passed_up = [Event("u", SEEN, tuple(int(ids[m]) for m in crime[20 + 10 * k : 30 + 10 * k])) for k in range(8)]
    shifted = [Event("u", CLICKED, (int(ids[m]),)) for m in comedy[:3]]
    g_crime, g_comedy = (int(catalog.facet_index([-facet_key(catalog, "genres", g)])[0]) for g in ("Crime", "Comedy"))

    def effects(config: PolicyConfig, events: list[Event]) -> np.ndarray:
        state = ShardState(catalog, config)
        state.apply(events)
        view = state.model.view(state.counts_of("u"))
        return np.array([policy.facet_effects(state.model, view, np.random.default_rng(s)) for s in range(200)])

    forgetting, keeping = PolicyConfig(), PolicyConfig(forget_half_life=0)
    assert forgetting.forget_half_life > 0  # the default fades
    still = clicks + shifted
    assert np.array_equal(effects(forgetting, still), effects(keeping, still))
    moved = clicks + passed_up + shifted
    fading, kept = effects(forgetting, moved).mean(axis=0), effects(keeping, moved).mean(axis=0)
    assert fading[g_crime] < kept[g_crime] - 0.2, (fading[g_crime], kept[g_crime])
    assert fading[g_comedy] > fading[g_crime] and kept[g_comedy] < kept[g_crime]


def test_clicks_on_a_rare_genre_say_more_than_on_a_common_one(catalog: Catalog) -> None:
    """Ten clicks on Crime dramas: Crime (a fifth of the catalog) earns a clear preference,
    Drama (half the catalog, where clicks land anyway) much less of one."""
    state = ShardState(catalog, rng=np.random.default_rng(3))
    crime_drama = [m.id for m in catalog.movies if set(m.facets.get("genres", [])) == {"Crime", "Drama"}][:10]
    state.apply([Event("u", CLICKED, (m,)) for m in crime_drama])
    view = state.model.view(state.counts_of("u"))
    crime, drama = (catalog.facet_index([-facet_key(catalog, "genres", g)])[0] for g in ("Crime", "Drama"))
    draws = np.array([policy.facet_effects(state.model, view, np.random.default_rng(s)) for s in range(200)])
    assert draws[:, crime].mean() > 0  # a preference, not indifference
    difference = draws[:, crime] - draws[:, drama]
    assert difference.mean() > 3 * difference.std(ddof=1) / np.sqrt(len(difference)), difference.mean()


def test_the_backfit_over_facet_sets_is_the_backfit_over_the_movies(catalog: Catalog) -> None:
    """The backfit runs over the user's facet sets (bounded by the catalog), each with its movies'
    trials x global click rate summed: the same fit, to rounding, as over every movie the user
    touched (written out here as it ran before, over a user with 2,000 rows)."""
    state = ShardState(catalog, rng=np.random.default_rng(5))
    rng = np.random.default_rng(6)
    ids = catalog.movie_ids
    events = [Event("u", SEEN, tuple(int(m) for m in rng.choice(ids, 10, replace=False))) for _ in range(200)]
    events += [Event("u", CLICKED, (int(m),)) for m in rng.choice(ids, 30, replace=False)]
    state.apply(events)
    model, counts = state.model, state.counts_of("u")
    view = model.view(counts)
    assert len(view.facet_set) < len(userstate.movies(counts)) / 4  # the point of it
    clicks, recent = view.clicks, policy._recent_clicks(model.config, view)
    got = policy._backfit_expectations(model, view, clicks, recent)

    assert model.incidence is not None
    movies = userstate.movies(counts)
    mi = catalog.movie_index(movies[:, userstate.KEY])
    base = np.maximum(movies[:, userstate.IMPRESSIONS], movies[:, userstate.CLICKS]) * model.movie_mean[mi]
    member = model.incidence[mi][:, view.facet]
    a, typical = model.config.facet_strength, model.typical_exposure
    prior = typical * model.facet_share[view.facet]
    w, b = np.zeros(len(view.facet)), 0.0
    for _ in range(3):
        rate = base * np.exp(member @ w)
        b = np.log((a + clicks) / (a + rate.sum() + (prior * np.exp(w)).sum() + typical))
        w += np.log((a + recent) / (a + np.exp(b) * (rate @ member + prior * np.exp(w))))
    expected = np.exp(b) * ((base * np.exp(member @ w)) @ member + prior * np.exp(w)) / np.exp(w)
    np.testing.assert_allclose(got, expected, rtol=1e-9)


def test_each_pick_comes_with_a_reason(catalog: Catalog) -> None:
    state = ShardState(catalog, rng=np.random.default_rng(4))
    crime = [m.id for m in catalog.movies if "Crime" in m.facets.get("genres", [])][100:115]
    state.apply([Event("fan", CLICKED, (m,)) for m in crime])
    ids, reasons = state.slate("fan", 10)
    assert len(ids) == len(reasons) == 10
    assert reasons.count("you like Crime") >= 5, reasons
    cold_ids, cold_reasons = state.slate("newcomer", 10)
    assert set(cold_reasons) <= {"popular", "something new"} and "popular" in cold_reasons


def claimed(reasons: list[str]) -> set[str]:
    return {r.removeprefix("you like ") for r in reasons if r.startswith("you like ")}


def test_no_taste_is_claimed_before_a_click_however_much_was_seen(catalog: Catalog) -> None:
    state = ShardState(catalog, rng=np.random.default_rng(8))
    ids = catalog.movie_ids
    for _ in range(30):
        _, reasons = state.slate("browser", 10)
        assert not claimed(reasons), reasons
        state.apply([Event("browser", SEEN, tuple(int(m) for m in np.random.default_rng(9).choice(ids, 10)))])


def test_four_crime_drama_clicks_name_crime_or_drama_and_nothing_else(catalog: Catalog) -> None:
    """The review's user: after four Crime/Drama clicks, slates said "you like Romance" six times."""
    state = ShardState(catalog, rng=np.random.default_rng(10))
    crime_drama = [m.id for m in catalog.movies if set(m.facets.get("genres", [])) == {"Crime", "Drama"}][:4]
    state.apply([Event("u", CLICKED, (m,)) for m in crime_drama])
    named = Counter(r for _ in range(50) for r in state.slate("u", 10)[1] if r.startswith("you like "))
    assert set(named) <= {"you like Crime", "you like Drama"} and named["you like Crime"] > 0, named


@given(
    history=st.lists(
        st.tuples(st.booleans(), st.integers(0, 10**6)), min_size=1, max_size=40
    ),  # (clicked?, which movie)
    seed=st.integers(0, 2**32 - 1),
)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_a_reason_names_a_facet_of_the_movie_that_the_user_clicked(
    catalog: Catalog, history: list[tuple[bool, int]], seed: int
) -> None:
    state = ShardState(catalog, rng=np.random.default_rng(seed))
    ids = catalog.movie_ids
    events = [Event("u", CLICKED if click else SEEN, (int(ids[m % len(ids)]),)) for click, m in history]
    state.apply(events)
    facets = facet_names(catalog)
    clicked = set().union(*(facets[e.movies[0]] for e in events if e.kind == CLICKED))
    movies, reasons = state.slate("u", 10)
    for movie, reason in zip(movies, reasons, strict=True):
        if reason.startswith("you like "):
            assert reason.removeprefix("you like ") in clicked & facets[movie], (reason, movie)
        else:
            assert reason in ("popular", "something new")


def test_opened_movies_go_to_the_back(small: Catalog) -> None:
    state = ShardState(small, rng=np.random.default_rng(1))
    state.apply([Event("u", CLICKED, (m,)) for m in (2, 4, 15)])  # Crime
    slate, _ = state.slate("u", 10)
    assert not {2, 4, 15} & set(slate)
    everything, _ = state.slate("u", 100)
    assert len(everything) == len(small) and set(everything) == set(small.movie_ids.tolist())
    assert set(everything[-3:]) == {2, 4, 15}


def test_limit_larger_than_catalog_and_empty_catalog(small: Catalog) -> None:
    model = policy.Model(small)
    view = model.view(userstate.empty())
    assert len(policy.draw_slate(model, view, 1000, np.random.default_rng(0)).movies) == len(small)
    empty = Catalog.from_movies([])
    assert (
        policy.draw_slate(
            policy.Model(empty), policy.Model(empty).view(userstate.empty()), 10, np.random.default_rng(0)
        ).movies.size
        == 0
    )


@pytest.mark.parametrize("size", [0, 1, 2, 7, 500])
def test_the_unique_helpers_agree_with_numpy(size: int) -> None:
    values = np.random.default_rng(size).integers(-5, 40, size)
    uniq, inverse = unique(values)
    expected, expected_inverse = np.unique(values, return_inverse=True)
    assert np.array_equal(uniq, expected) and np.array_equal(inverse, expected_inverse)
    assert np.array_equal(sorted_set(values), expected)


def test_bumping_many_users_at_once_is_bumping_each() -> None:
    rng = np.random.default_rng(3)
    for _ in range(200):
        n = int(rng.integers(1, 6))
        states = []
        for _ in range(n):  # each user's state: sorted unique keys, movies and facets
            keys = np.unique(rng.integers(-5, 30, int(rng.integers(0, 12))))
            state = np.zeros((len(keys), userstate.WIDTH), dtype=userstate.DTYPE)
            state[:, 0] = keys
            state[:, 1:] = rng.integers(0, 5, (len(keys), 3))
            states.append(state)
        rows = int(rng.integers(0, 20))
        packed = np.unique(rng.integers(0, n, rows).astype(np.int64) * 100 + rng.integers(-5, 30, rows) + 50)
        users, keys = packed // 100, (packed % 100 - 50).astype(userstate.DTYPE)
        clicks, seen, since = (rng.integers(0, 3, len(packed)).astype(userstate.DTYPE) for _ in range(3))
        expected = [s.copy() for s in states]
        for u in range(n):
            mine = users == u
            if mine.any():
                expected[u] = userstate.bump(expected[u], keys[mine], clicks[mine], seen[mine], since[mine])
        got = userstate.bump_many([s.copy() for s in states], users, keys, clicks, seen, since)
        assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))


def test_resident_users_are_invisible_to_the_garbage_collector(small: Catalog) -> None:
    """A full collection walks every tracked object: the users (a shard holds 250,000 by default)
    must not be among them, or each pass stalls the shard (120 ms over 250,000 user objects)."""
    import gc

    state = ShardState(small, rng=np.random.default_rng(0))
    state.admit(["a", "b"], [])
    everything = tuple(small.movie_ids.tolist())
    state.apply([Event("a", SEEN, (1, 2), "e1"), Event("c", CLICKED, (3,)), Event("c", SEEN, everything)])
    state.slate("c", 3)  # c's state outgrew the policy's digest of it: c keeps one
    state.apply([Event("c", SEEN, everything[:2])])
    gc.collect()
    gc.collect()  # a tuple holding a tuple (c's digest) is let go a collection after the one it holds
    assert state.users["c"][DIGEST] is not None
    assert len(state.users) == 3 and not any(gc.is_tracked(user) for user in state.users.values())
