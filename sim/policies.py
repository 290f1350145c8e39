"""The policies the simulator compares: mabrec's (the service's own code) and the baselines a
user would otherwise run, including the original design this project replaces.

Every policy answers `slate(user, round)` with up to 10 dense movie indices, best first, and
hears every event: `observe(user, round, slate, clicked)` after each slate (clicked: the movie,
or -1), and `opened(user, round, movie)` when the user opened a movie from the catalog list.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Protocol

import numpy as np

from system.core.catalog import Catalog
from system.core.events import CLICKED, SEEN, Event
from system.core.policy_config import PolicyConfig
from system.core.shard_state import ShardState

SLATE = 10


class Policy(Protocol):
    name: str

    def slate(self, user: int, round: int) -> np.ndarray: ...

    def observe(self, user: int, round: int, slate: np.ndarray, clicked: int) -> None: ...

    def opened(self, user: int, round: int, movie: int) -> None: ...

    def end_round(self, round: int) -> None: ...


class Mabrec:
    """The service's policy, through the shard's own state code: the same events, the same
    arithmetic, the same slates (one shard holding every user; popularity refreshed per round)."""

    name = "mabrec"

    def __init__(self, catalog: Catalog, seed: int, config: PolicyConfig | None = None) -> None:
        self.catalog = catalog
        self.state = ShardState(catalog, config, np.random.default_rng(seed))
        self.pending: list[Event] = []

    def slate(self, user: int, round: int) -> np.ndarray:
        ids, _ = self.state.slate(f"u{user}", SLATE)
        return self.catalog.movie_index(ids)

    def observe(self, user: int, round: int, slate: np.ndarray, clicked: int) -> None:
        uxid = f"u{user}"
        self.pending.append(Event(uxid, SEEN, tuple(self.catalog.movie_ids[slate].tolist()), f"imp-{round}-{user}"))
        if clicked >= 0:
            self.pending.append(Event(uxid, CLICKED, (int(self.catalog.movie_ids[clicked]),), f"clk-{round}-{user}"))

    def opened(self, user: int, round: int, movie: int) -> None:
        self.pending.append(Event(f"u{user}", CLICKED, (int(self.catalog.movie_ids[movie]),), f"open-{round}-{user}"))

    def end_round(self, round: int) -> None:
        self.state.apply(self.pending)
        self.pending = []
        self.state.refresh_model()  # the live system shares popularity every 5 s


class _Global:
    """Shared statistics of all users per movie (impressions, clicks); each user's clicked
    movies are left out of their slates. Scores change only with feedback, which comes after a
    round's slates, so they are ranked once a round."""

    def __init__(self, catalog: Catalog, seed: int) -> None:
        self.n = len(catalog)
        self.impressions = np.zeros(self.n)
        self.clicks = np.zeros(self.n)
        self.rng = np.random.default_rng(seed)
        self.clicked: dict[int, set[int]] = defaultdict(set)
        # Ties (everything, at first) break by catalog order: by id, the most popular first.
        self.tiebreak = -np.arange(self.n) * 1e-9
        self._ranked: np.ndarray | None = None

    def scores(self) -> np.ndarray:
        raise NotImplementedError

    def ranked(self) -> np.ndarray:
        if self._ranked is None:
            scores = self.scores() + self.tiebreak
            self._ranked = np.argsort(-scores, kind="stable")
        return self._ranked

    def slate(self, user: int, round: int) -> np.ndarray:
        ranked, seen = self.ranked(), self.clicked[user]
        head = ranked[: SLATE + len(seen)]
        return head[[m not in seen for m in head.tolist()]][:SLATE]

    def observe(self, user: int, round: int, slate: np.ndarray, clicked: int) -> None:
        self.impressions[slate] += 1
        if clicked >= 0:
            self.clicks[clicked] += 1
            self.clicked[user].add(clicked)

    def opened(self, user: int, round: int, movie: int) -> None:
        self.clicked[user].add(movie)

    def end_round(self, round: int) -> None:
        self._ranked = None


class RandomSlates(_Global):
    name = "random"

    def slate(self, user: int, round: int) -> np.ndarray:
        picks = self.rng.choice(self.n, SLATE + len(self.clicked[user]), replace=False)
        return picks[[m not in self.clicked[user] for m in picks.tolist()]][:SLATE]


class Popularity(_Global):
    """Greedy on global CTR, smoothed toward 1 in 50 (of the priors tried, the one that served
    this baseline best); unseen movies rank by catalog order."""

    name = "popularity"

    def scores(self) -> np.ndarray:
        return (self.clicks + 1.0) / (self.impressions + 50.0)


class EpsilonGreedy(Popularity):
    """Each slot: with probability epsilon a random movie, else the next best global CTR."""

    name = "epsilon-greedy"
    epsilon = 0.1

    def slate(self, user: int, round: int) -> np.ndarray:
        greedy = super().slate(user, round)
        explore = self.rng.random(len(greedy)) < self.epsilon
        picks = greedy.copy()
        picks[explore] = self.rng.choice(self.n, int(explore.sum()), replace=False)
        _, first = np.unique(picks, return_index=True)  # keep the slate's movies distinct
        return picks[np.sort(first)]


class UCB1(_Global):
    """Global CTR plus sqrt(2 ln N / n): unseen movies first, then the optimistic ones."""

    name = "ucb1"

    def scores(self) -> np.ndarray:
        total = max(self.impressions.sum(), 1.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            bonus = np.sqrt(2.0 * np.log(total) / self.impressions)
        return np.where(self.impressions > 0, self.clicks / np.maximum(self.impressions, 1) + bonus, 1e6)


class OriginalDesign:
    """The algorithm of the Go service this project replaces, as its design specifies:

    - every event updates Beta(alpha, beta), from (1, 1), of the (user, movie) pair and of each
      (user, genre) and (user, director) of the movie: alpha += r, beta += 1 - r (r = 1 click);
    - the user's list: for genres and directors separately, the user's 10 entities with the
      highest alpha among those touched in the last 7 days, Thompson-sampled, top 2 genres and
      top 5 directors; for each group, the movies of those entities not touched by the user in
      the last day, ordered by the highest alpha any user has for the movie (the original's join
      does not filter by user), at most 10, Thompson-sampled, top 5; the union of both groups;
    - a request returns the stored list, in no particular order, and marks each movie seen;
    - a user who touched nothing gets an empty list.
    The list is recomputed after every event; only the one computed after the last event before
    a request is ever returned, so it is computed then (the same list, from the same state). A
    round is a day. The shipped catalog has no directors, so the director group stays empty.
    """

    name = "original"

    def __init__(self, catalog: Catalog, seed: int) -> None:
        self.catalog = catalog
        self.rng = np.random.default_rng(seed)
        n = len(catalog)
        # Per user, per movie and per facet (genre, director): [alpha, beta, last round touched].
        self.movie_rows: dict[int, dict[int, list[float]]] = defaultdict(dict)
        self.facet_rows: dict[int, dict[int, list[float]]] = defaultdict(dict)
        # Per movie: the row (alpha, beta) with the highest alpha of any user; Beta(1, 1) while none.
        self.best_alpha = np.ones(n)
        self.best_beta = np.ones(n)
        self.best_user = np.full(n, -1)
        self.touched: dict[tuple[int, int], set[int]] = defaultdict(set)  # (user, round) -> movies
        self._ranked_round = -1
        self._ranked: tuple[dict[int, np.ndarray], np.ndarray] = ({}, np.zeros(0, dtype=np.int64))
        self.facets_by_kind = {
            kind: {j for j, f in enumerate(catalog.facets) if f.kind == kind} for kind in ("genres", "directors")
        }

    def _event(self, user: int, round: int, movie: int, r: int) -> None:
        movie_rows, facet_rows = self.movie_rows[user], self.facet_rows[user]
        for rows, key in [(movie_rows, movie)] + [(facet_rows, int(j)) for j in self.catalog.facets_of(movie)]:
            row = rows.get(key)
            if row is None:
                row = rows[key] = [1.0, 1.0, round]
            row[0] += r
            row[1] += 1 - r
            row[2] = round
        alpha, beta = movie_rows[movie][0], movie_rows[movie][1]
        if self.best_user[movie] in (-1, user) or alpha > self.best_alpha[movie]:
            self.best_alpha[movie], self.best_beta[movie], self.best_user[movie] = alpha, beta, user
        self.touched[(user, round)].add(movie)
        self.touched.pop((user, round - 2), None)  # only "the last day" is ever asked for

    def slate(self, user: int, round: int) -> np.ndarray:
        rows = self.facet_rows.get(user)
        if not rows and not self.movie_rows.get(user):
            return np.zeros(0, dtype=np.int64)
        picks: list[int] = []
        for kind, keep in (("genres", 2), ("directors", 5)):
            kind_facets = self.facets_by_kind[kind]
            recent = [(f, row) for f, row in (rows or {}).items() if f in kind_facets and row[2] >= round - 7]
            if not recent:
                continue
            recent.sort(key=lambda item: -item[1][0])
            top = recent[:10]
            draws = self.rng.beta([r[0] for _, r in top], [r[1] for _, r in top])
            chosen = [top[i][0] for i in np.argsort(-draws)[:keep]]
            touched_yesterday = self.touched.get((user, round - 1), set()) | self.touched.get((user, round), set())
            by_alpha, rank = self._by_alpha(round)
            heads = [by_alpha[f][: 10 + len(touched_yesterday)] for f in chosen]
            movies = np.unique(np.concatenate(heads))
            movies = movies[np.argsort(rank[movies], kind="stable")]
            order = np.array([m for m in movies.tolist() if m not in touched_yesterday][:10], dtype=np.int64)
            if not len(order):
                continue
            draws = self.rng.beta(self.best_alpha[order], self.best_beta[order])
            picks.extend(order[np.argsort(-draws)[:5]].tolist())
        slate = np.array(list(dict.fromkeys(picks)), dtype=np.int64)
        self.rng.shuffle(slate)  # the stored list has no order
        return slate

    def _by_alpha(self, round: int) -> tuple[dict[int, np.ndarray], np.ndarray]:
        """Each genre's movies by the highest alpha any user has, and every movie's rank in that
        order; ranked once a round (events come after a round's slates)."""
        if self._ranked_round != round:
            order = np.argsort(-self.best_alpha, kind="stable")
            rank = np.empty(len(order), dtype=np.int64)
            rank[order] = np.arange(len(order))
            self._ranked = ({}, rank)
            self._ranked_round = round
        by_alpha, rank = self._ranked
        return _LazySorted(self.catalog, rank, by_alpha), rank

    def observe(self, user: int, round: int, slate: np.ndarray, clicked: int) -> None:
        for movie in slate:
            self._event(user, round, int(movie), 0)
        if clicked >= 0:
            self._event(user, round, clicked, 1)

    def opened(self, user: int, round: int, movie: int) -> None:
        self._event(user, round, movie, 1)

    def end_round(self, round: int) -> None:
        pass


class _LazySorted(dict[int, np.ndarray]):
    """facet -> its movies sorted by a rank, computed on first use and kept for the round."""

    def __init__(self, catalog: Catalog, rank: np.ndarray, cache: dict[int, np.ndarray]) -> None:
        super().__init__()
        self.catalog, self.rank, self.cache = catalog, rank, cache

    def __getitem__(self, facet: int) -> np.ndarray:
        if facet not in self.cache:
            movies = self.catalog.movies_of(facet)
            self.cache[facet] = movies[np.argsort(self.rank[movies], kind="stable")]
        return self.cache[facet]


BASELINES: dict[str, Callable[[Catalog, int], Policy]] = {
    "random": RandomSlates,
    "popularity": Popularity,
    "epsilon-greedy": EpsilonGreedy,
    "ucb1": UCB1,
    "original": OriginalDesign,
}


def make(name: str, catalog: Catalog, seed: int, config: PolicyConfig | None = None) -> Policy:
    if name == "mabrec":
        return Mabrec(catalog, seed, config)
    baseline: Policy = BASELINES[name](catalog, seed)
    return baseline
