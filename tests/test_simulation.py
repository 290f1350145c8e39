"""The simulator's math (click model, oracle, regret), the original design's algorithm, and a
small fixed-seed comparison."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from sim import policies
from sim.runner import Coherence, Scenario, intra_list_diversity, run, run_one, shift_recovery, shipped_catalog
from sim.world import World, WorldConfig
from system.core.catalog import Catalog
from system.core.catalog_file import read_movies
from tests.conftest import SMALL_CSV


@pytest.fixture(scope="module")
def small() -> Catalog:
    return Catalog.from_movies(list(read_movies(SMALL_CSV)))


def test_click_probability_is_the_cascade_formula(small: Catalog) -> None:
    world = World(small, 3, seed=1, config=WorldConfig(patience=0.8))
    user, slate = np.array([0]), np.array([[4, 9, 2]])
    p = world._p[0, [4, 9, 2]]
    # They look at position k with probability 0.8^k, and click there if they did not before.
    by_hand = p[0] + 0.8 * (1 - p[0]) * p[1] + 0.8**2 * (1 - p[0]) * (1 - p[1]) * p[2]
    assert world.click_probability(user, slate)[0] == pytest.approx(by_hand)
    # Padding (-1) and consumed movies never get clicked.
    world.consumed[0, 9] = True
    assert world.click_probability(user, np.array([[4, -1, 2]]))[0] == pytest.approx(
        world.click_probability(user, np.array([[4, 9, 2]]))[0]
    )


def test_simulated_clicks_match_the_formula(small: Catalog) -> None:
    world = World(small, 1, seed=3, config=WorldConfig(base_logit=-1.0, browse=0.0))
    slate = np.array([[1, 5, 7, 11, 13]])
    expected = world.click_probability(np.array([0]), slate)[0]
    clicks = 0
    for _ in range(20_000):
        position, _ = world.react(np.array([0]), slate)
        clicks += position[0] >= 0
        world.consumed[:] = False  # keep the movies fresh for the next draw
    assert clicks / 20_000 == pytest.approx(expected, abs=0.015)


def test_coherence_by_hand() -> None:
    """Movies 0-3 with genres A, A+B, B, C; one user clicks movie 0 (A) between two slates."""
    genres = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 1]], dtype=float)
    coherence = Coherence(genres, users=1)
    coherence.see(np.array([[0, 2, -1]]))  # no click yet: no taste to follow; no previous slate
    coherence.clicked(np.array([0]), np.array([0]))
    coherence.see(np.array([[1, 3, 0]]))  # mix A 2/4, B 1/4, C 1/4 against A 1/2, B 1/2
    got = coherence.result()
    # follows: movies 1 and 0 have A, 3 has not (1 click: group 1); swing 0.5*(0 + 1/4 + 1/4);
    # overlap: movie 0 again, of 3.
    assert got["follows"][:2] == [None, pytest.approx(2 / 3)]
    assert got["swing"][:2] == [None, pytest.approx(0.25)]
    assert got["overlap"][:2] == [None, pytest.approx(1 / 3)]


def test_the_oracle_order_is_the_best_of_all(small: Catalog) -> None:
    world = World(small, 1, seed=5, config=WorldConfig(base_logit=-1.0))
    best = world.click_probability(np.array([0]), world.oracle(np.array([0])))[0]
    top = world.oracle(np.array([0]))[0]
    for order in itertools.islice(itertools.permutations(top[:6]), 0, 720, 7):
        candidate = np.concatenate([order, top[6:]])[None, :]
        assert world.click_probability(np.array([0]), candidate)[0] <= best + 1e-12
    others = np.array([[m for m in range(len(small)) if m not in top][:10]])
    assert world.click_probability(np.array([0]), others)[0] <= best


def test_regret_is_never_negative_and_random_has_more() -> None:
    scenario = Scenario(users=60, rounds=15)
    mine, rand = run_one("mabrec", 0, scenario), run_one("random", 0, scenario)
    assert min(mine["regret"]) >= -1e-9 and min(rand["regret"]) >= -1e-9
    assert sum(rand["regret"]) > sum(mine["regret"])


def test_a_taste_shift_redraws_favourites() -> None:
    world = World(shipped_catalog(), 50, seed=0)
    before = world.favourites.copy()
    world.draw_tastes()
    assert (world.favourites != before).any(axis=1).mean() > 0.8


def test_diversity_and_shift_recovery_arithmetic() -> None:
    genres = np.array([[1, 0], [1, 0], [0, 1]], dtype=float)
    assert intra_list_diversity(genres, np.array([[0, 1, -1]]))[0] == 0.0  # identical genre sets
    assert intra_list_diversity(genres, np.array([[0, 2, -1]]))[0] == 1.0  # disjoint
    ctr = np.array([0.2] * 20 + [0.05, 0.1, 0.15, 0.17, 0.18, 0.2, 0.2])
    assert shift_recovery(ctr, 20) == {"pre_shift_ctr": 0.2, "lowest_after": 0.05, "rounds_to_80_percent": 7}


def test_the_original_design_as_specified(small: Catalog) -> None:
    original = policies.OriginalDesign(small, seed=0)
    assert len(original.slate(0, 0)) == 0  # a user who touched nothing gets nothing
    godfather = int(small.movie_index([2])[0])  # Crime, Drama; Coppola
    original.opened(0, 0, godfather)
    crime = next(j for j, f in enumerate(small.facets) if f.name == "Crime")
    assert original.facet_rows[0][crime][:2] == [2.0, 1.0]  # alpha += 1 on a click, from (1, 1)
    original.observe(0, 0, np.array([godfather]), -1)
    assert original.facet_rows[0][crime][:2] == [2.0, 2.0]  # beta += 1 on an impression
    slate = original.slate(0, 1)
    assert 0 < len(slate) <= 10 and godfather not in slate  # touched in the last day: left out
    later = original.slate(0, 3)
    assert len(later) > 0  # the 7-day window still holds the genres
    assert len(original.slate(0, 20)) == 0  # nothing touched in the last 7 days: nothing


def test_a_small_comparison_ranks_sensibly_and_the_same_seed_gives_the_same_numbers() -> None:
    result = run(("mabrec", "original", "random"), seeds=2, scenario=Scenario(users=60, rounds=30), workers=2)
    clicks = {p: s["clicks_per_user_all_rounds"][0] for p, s in result["policies"].items()}
    assert clicks["mabrec"] > clicks["random"] and clicks["mabrec"] > clicks["original"]
    assert result["policies"]["mabrec"]["empty_slates"] == 0 and result["policies"]["original"]["empty_slates"] > 0
    tiny = Scenario(users=30, rounds=10)
    assert run_one("mabrec", 3, tiny)["ctr"] == run_one("mabrec", 3, tiny)["ctr"]
    assert run_one("mabrec", 3, tiny)["ctr"] != run_one("mabrec", 4, tiny)["ctr"]
