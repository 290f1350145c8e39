"""Synthetic users with a hidden taste, on the real catalog, and how they click.

A user's probability of clicking movie m once they look at it is
    p_um = sigmoid(b0 + mean over m's genres of a_ug + q_u * z(rating_m) + e_um)
with genre affinities a_ug ~ N(0, 1) plus a boost on 2 favourite genres, a liking for well-rated
movies q_u ~ U(0.2, 0.8), and an idiosyncratic taste e_um ~ N(0, 0.7) per (user, movie). A movie a
user clicked is consumed: they will not click it again.

A round is one visit (a day): the user asks for a slate of 10 and scans it top down (cascade):
they look at position k with probability patience^k, click the first movie they like (a
Bernoulli(p) draw), and stop. If the slate gets no click, with probability `browse` they go to
the catalog instead and open one of its first 100 movies (the list is by id, most popular first),
chosen in proportion to how much they like them: every policy sees that click too, so a policy
that shows nothing still learns something (the original design needs it: it shows new users
nothing). A taste shift re-draws every user's genre affinities (new favourites) at a given round.

The oracle knows p and shows the 10 unconsumed movies with the highest p, best first, which
maximizes the chance of a click under this cascade; regret is the oracle's click probability
minus the policy's, both computed exactly from p (not from the draws).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from system.core.catalog import Catalog

SLATE = 10


@dataclass(frozen=True)
class WorldConfig:
    base_logit: float = -5.0
    favourite_genres: int = 2
    favourite_boost: float = 2.5
    affinity_sd: float = 1.0
    quality_low: float = 0.2
    quality_high: float = 0.8
    idiosyncratic_sd: float = 0.7
    patience: float = 0.9
    browse: float = 0.3
    browse_first: int = 100


class World:
    def __init__(self, catalog: Catalog, users: int, seed: int, config: WorldConfig | None = None) -> None:
        self.catalog = catalog
        self.config = cfg = config or WorldConfig()
        self.users = users
        self.rng = np.random.default_rng(seed)
        m, g = len(catalog), len(catalog.facets)
        # Genre membership, each movie's row averaged over its genres.
        self.genres = np.zeros((m, g))
        self.genres[catalog.pair_movie, catalog.pair_facet] = 1.0
        self.genre_mean = self.genres / np.maximum(self.genres.sum(axis=1, keepdims=True), 1.0)
        rating = np.nan_to_num(catalog.rating, nan=float(np.nanmean(catalog.rating)))
        self.quality_z = (rating - rating.mean()) / rating.std()
        self.quality = self.rng.uniform(cfg.quality_low, cfg.quality_high, users)
        self.idiosyncratic = self.rng.normal(0.0, cfg.idiosyncratic_sd, (users, m)).astype(np.float32)
        self.consumed = np.zeros((users, m), dtype=bool)
        self.draw_tastes()

    def draw_tastes(self) -> None:
        """(Re)draw genre affinities: the start, or a taste shift."""
        cfg, g = self.config, len(self.catalog.facets)
        self.affinity = self.rng.normal(0.0, cfg.affinity_sd, (self.users, g))
        favourites = np.argsort(self.rng.random((self.users, g)), axis=1)[:, : cfg.favourite_genres]
        np.put_along_axis(
            self.affinity, favourites, np.take_along_axis(self.affinity, favourites, 1) + cfg.favourite_boost, 1
        )
        self.favourites = favourites
        logits = cfg.base_logit + self.affinity @ self.genre_mean.T + self.quality[:, None] * self.quality_z[None, :]
        self._p = 1.0 / (1.0 + np.exp(-(logits + self.idiosyncratic)))
        self._best = np.argsort(-self._p, axis=1)[:, : SLATE * 20]  # each user's favourites, best first

    def p(self, users: np.ndarray, slates: np.ndarray) -> np.ndarray:
        """Click probabilities, users x slate positions (0 for consumed movies and for padding, -1)."""
        movies = np.maximum(slates, 0)
        rows = users[:, None]
        return np.where((slates < 0) | self.consumed[rows, movies], 0.0, self._p[rows, movies])

    def click_probability(self, users: np.ndarray, slates: np.ndarray) -> np.ndarray:
        """Per user, P(they click something) on their slate, exactly, under the cascade."""
        if slates.shape[1] == 0:
            return np.zeros(len(users))
        p = self.p(users, slates)
        look = self.config.patience ** np.arange(slates.shape[1])  # P(they get as far as k)
        passed = np.hstack([np.ones((len(users), 1)), np.cumprod(1.0 - p, axis=1)[:, :-1]])  # no click before k
        clicked: np.ndarray = (look * p * passed).sum(axis=1)
        return clicked

    def oracle(self, users: np.ndarray) -> np.ndarray:
        """Per user, the 10 unconsumed movies they like most, best first."""
        out = np.empty((len(users), SLATE), dtype=np.int64)
        for i, user in enumerate(users):
            best = self._best[user]
            fresh = best[~self.consumed[user, best]][:SLATE]
            if len(fresh) < SLATE:  # consumed more than we ranked: rank everything
                p = np.where(self.consumed[user], -1.0, self._p[user])
                top = np.argpartition(-p, SLATE)[:SLATE]
                fresh = top[np.argsort(-p[top])]
            out[i] = fresh
        return out

    def react(self, users: np.ndarray, slates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per user: the position clicked (-1: none) and the movie opened from the catalog (-1: none).

        The cascade: position 0 is looked at; after each movie not clicked the user goes on with
        probability `patience`; the first movie looked at and liked (a Bernoulli(p) draw) is
        clicked, and they stop."""
        cfg, n = self.config, len(users)
        width = slates.shape[1]
        clicked = np.full(n, -1)
        if width:
            p = self.p(users, slates)
            go_on = np.hstack([np.ones((n, 1), dtype=bool), self.rng.random((n, width - 1)) < cfg.patience])
            looked = np.cumprod(go_on, axis=1).astype(bool)
            liked = looked & (self.rng.random((n, width)) < p)
            hit = liked.any(axis=1)
            clicked[hit] = liked[hit].argmax(axis=1)
            self.consumed[users[hit], slates[hit, clicked[hit]]] = True
        opened = np.full(n, -1)
        browsing = np.flatnonzero((clicked < 0) & (self.rng.random(n) < cfg.browse))
        if len(browsing):
            first = self.p(users[browsing], np.tile(np.arange(cfg.browse_first), (len(browsing), 1)))
            total = first.sum(axis=1)
            pick = (self.rng.random(len(browsing)) * total)[:, None] > np.cumsum(first, axis=1)
            chosen = pick.sum(axis=1)
            ok = total > 0
            opened[browsing[ok]] = chosen[ok]
            self.consumed[users[browsing[ok]], chosen[ok]] = True
        return clicked, opened
