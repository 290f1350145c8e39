"""Thompson sampling: pure numpy, no I/O, the random generator passed in.

Per user the state holds, for every movie and facet value (genre, director, ...) touched, the
original service's Beta(alpha, beta) evidence: clicks and impressions (system/userstate.py).
The model on top of it is hierarchical:
- every movie has a global posterior mean: a catalog prior (rating, votes) sharpened by all
  users' feedback;
- a user's preference for a facet value is a Gamma posterior over how much more often their
  clicks land on it than chance would have it (see `facet_lift`); each movie's prior mean for
  the user is the global one lifted, in logits, by the sampled preferences for its facets;
- the user's own evidence on the movie updates a Beta around that prior mean.
One draw per movie, the whole catalog at once, ranks it; the slate is the best draws with a mild
penalty for piling up the same facets, and movies the user already opened go last.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np

from system import userstate
from system.arrays import ranges
from system.catalog import Catalog

_EPS = 1e-6


@dataclass(frozen=True)
class PolicyConfig:
    base_rate: float = 0.08  # prior click rate of an average movie, clicks / (clicks + impressions)
    rating_weight: float = 0.4  # logit shift per standard deviation of catalog rating
    votes_weight: float = 0.2  # logit shift per standard deviation of log(votes)
    global_movie_strength: float = 20.0  # pseudo-counts of the catalog prior in a movie's global posterior
    movie_strength: float = 20.0  # pseudo-counts of a user's movie prior: lower explores more
    facet_strength: float = 2.0  # Gamma prior shape/rate of a facet preference (in expected clicks)
    exposure_prior: float = 200.0  # pseudo-impressions at the catalog's facet shares (see facet_lift)
    max_lift: float = 3.0  # bound, in logits, of one facet value's effect on a movie
    facet_weights: Mapping[str, float] = field(
        default_factory=lambda: MappingProxyType({"genres": 2.0, "directors": 1.5, "actors": 1.0})
    )
    other_facet_weight: float = 1.0
    diversity: float = 0.1  # logit penalty per earlier pick sharing a movie's facets (on average)
    clicked_penalty: float = 1e3  # logits: movies the user already opened go to the back of the line
    pool_factor: int = 5  # the diversity re-rank looks at limit * pool_factor best draws


@dataclass(frozen=True)
class UserView:
    """A user's evidence mapped onto the catalog's dense indices (entities not in it dropped)."""

    movie: np.ndarray
    movie_clicks: np.ndarray
    movie_seen: np.ndarray
    facet: np.ndarray
    facet_clicks: np.ndarray
    facet_seen: np.ndarray

    @property
    def cold(self) -> bool:
        return not (len(self.movie) or len(self.facet))


@dataclass(frozen=True)
class Slate:
    movies: np.ndarray  # dense movie indices, best first
    scores: np.ndarray  # sampled logits of the picks


class Model:
    """What all users share: catalog arrays and global (all users) posteriors, precomputed."""

    def __init__(
        self,
        catalog: Catalog,
        config: PolicyConfig | None = None,
        global_clicks: np.ndarray | None = None,
        global_seen: np.ndarray | None = None,
    ) -> None:
        """`global_clicks` / `global_seen` are dense counts: M movies, then F facets."""
        self.catalog = catalog
        self.config = cfg = config or PolicyConfig()
        m, f = len(catalog.movies), len(catalog.facets)
        clicks = np.zeros(m + f) if global_clicks is None else np.asarray(global_clicks, dtype=np.float64)
        seen = np.zeros(m + f) if global_seen is None else np.asarray(global_seen, dtype=np.float64)

        prior = _sigmoid(
            _logit(cfg.base_rate)
            + cfg.rating_weight * _zscore(catalog.rating)
            + cfg.votes_weight * _zscore(np.log1p(catalog.votes))
        )
        g = cfg.global_movie_strength
        self.movie_mean = (g * prior + clicks[:m]) / (g + clicks[:m] + seen[:m])
        self.movie_logit = _logit(self.movie_mean)

        # The share of the catalog carrying each facet value: what a user's clicks would land on
        # by chance, before their impressions tell what they were actually shown.
        self.facet_share = np.diff(catalog.facet_movies_ptr) / max(m, 1)
        kind_weight = np.array(
            [cfg.facet_weights.get(kind, cfg.other_facet_weight) for kind in catalog.facet_kinds] or [0.0]
        )
        self.facet_weight = kind_weight[catalog.facet_kind] if f else np.zeros(0)

    def view(self, state: np.ndarray) -> UserView:
        """Map a user's sparse state (see `system.userstate`) onto the catalog."""
        movies, facets = userstate.movies(state), userstate.facets(state)
        mi = self.catalog.movie_index(movies[:, userstate.KEY])
        fi = self.catalog.facet_index(-facets[:, userstate.KEY])
        mk, fk = mi >= 0, fi >= 0
        return UserView(
            movie=mi[mk],
            movie_clicks=movies[mk, userstate.CLICKS].astype(np.float64),
            movie_seen=movies[mk, userstate.SEEN].astype(np.float64),
            facet=fi[fk],
            facet_clicks=facets[fk, userstate.CLICKS].astype(np.float64),
            facet_seen=facets[fk, userstate.SEEN].astype(np.float64),
        )


def recommend(model: Model, user: UserView, limit: int, rng: np.random.Generator) -> Slate:
    """A slate of up to `limit` distinct movies, best first, by one Thompson draw per movie."""
    cfg, catalog = model.config, model.catalog
    n_movies = len(catalog.movies)
    limit = min(limit, n_movies)
    if limit <= 0:
        return Slate(np.zeros(0, dtype=np.int64), np.zeros(0))

    logits = model.movie_logit + facet_lift(model, user, rng)
    mean = _sigmoid(logits)
    alpha = cfg.movie_strength * mean
    beta = cfg.movie_strength * (1.0 - mean)
    alpha[user.movie] += user.movie_clicks
    beta[user.movie] += user.movie_seen
    scores = _logit(rng.beta(alpha, beta))
    scores[user.movie[user.movie_clicks > 0]] -= cfg.clicked_penalty
    return _diverse_top(catalog, scores, limit, cfg)


def facet_lift(model: Model, user: UserView, rng: np.random.Generator) -> np.ndarray:
    """Per movie, the summed log lift of the user's sampled preference for each facet value.

    A user's preference for facet value g is how much more often their clicks land on g than
    chance would have it: clicks on g ~ Poisson(lambda_g * expected_g), where expected_g is the
    user's clicks times g's share of what they were exposed to. lambda_g has a Gamma(a, a)
    prior, mean 1 (indifferent), so its posterior is Gamma(a + clicks_g, a + expected_g), and
    one draw of it is this request's Thompson sample. Clicks on a common genre (Drama) say
    little; on a rare one, much; many impressions of g without a click say "not g".

    Exposure is the user's impressions smoothed toward the catalog's shares with
    `exposure_prior` pseudo-impressions: clicks made while browsing the catalog are judged
    against the catalog, and a few slates shown afterwards do not undo them.
    """
    catalog, cfg = model.catalog, model.config
    lift = np.zeros(len(catalog.movies))
    if not len(user.facet):
        return lift
    exposure = (user.facet_seen + cfg.exposure_prior * model.facet_share[user.facet]) / (
        user.movie_seen.sum() + cfg.exposure_prior
    )
    expected = user.movie_clicks.sum() * exposure
    preference = rng.gamma(cfg.facet_strength + user.facet_clicks) / (cfg.facet_strength + expected)
    effect = np.clip(np.log(preference) * model.facet_weight[user.facet], -cfg.max_lift, cfg.max_lift)
    starts = catalog.facet_movies_ptr[user.facet]
    lengths = catalog.facet_movies_ptr[user.facet + 1] - starts
    movies = catalog.facet_movies[ranges(starts, lengths)]
    lift += np.bincount(movies, weights=np.repeat(effect, lengths), minlength=len(lift))
    return lift


def _diverse_top(catalog: Catalog, scores: np.ndarray, limit: int, cfg: PolicyConfig) -> Slate:
    """Greedy: take the best score, then penalize candidates by how many picks share their facets."""
    pool_size = min(len(scores), limit * cfg.pool_factor)
    pool = np.argpartition(-scores, pool_size - 1)[:pool_size]
    pool = pool[np.argsort(-scores[pool], kind="stable")]
    if cfg.diversity <= 0 or not len(catalog.facets):
        return Slate(pool[:limit], scores[pool[:limit]])

    starts = catalog.movie_facets_ptr[pool]
    lengths = catalog.movie_facets_ptr[pool + 1] - starts
    pair_facet = catalog.pair_facet[ranges(starts, lengths)]
    pair_owner = np.repeat(np.arange(pool_size), lengths)
    per_movie = np.maximum(lengths, 1)
    picked = np.zeros(len(catalog.facets))
    pool_scores = scores[pool]
    adjusted = pool_scores.copy()
    order = np.empty(limit, dtype=np.int64)
    for k in range(limit):
        j = int(np.argmax(adjusted))
        order[k] = j
        adjusted[j] = -np.inf
        picked[pair_facet[pair_owner == j]] += 1
        overlap = np.bincount(pair_owner, weights=picked[pair_facet], minlength=pool_size) / per_movie
        alive = np.isfinite(adjusted)
        adjusted[alive] = pool_scores[alive] - cfg.diversity * overlap[alive]
    chosen = pool[order]
    return Slate(chosen, scores[chosen])


def _zscore(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    ok = np.isfinite(x)
    if ok.sum() < 2:
        return np.zeros_like(x)
    std = x[ok].std()
    z = (x - x[ok].mean()) / (std if std > 0 else 1.0)
    return np.where(ok, z, 0.0)


def _logit(p: np.ndarray | float) -> np.ndarray:
    p = np.clip(p, _EPS, 1.0 - _EPS)
    return np.log(p) - np.log1p(-p)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))
