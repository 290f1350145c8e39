"""Thompson sampling: pure numpy, no I/O, the random generator passed in.

Per user the state holds, for every movie and facet value (genre, director, ...) touched, the
original service's Beta(alpha, beta) evidence: clicks and impressions (system/userstate.py).
The model on top of it is hierarchical:
- every movie has a global posterior mean: a catalog prior (rating, votes) sharpened by all
  users' feedback;
- a user's preference for a facet value is a Gamma posterior over how much more often they
  click its movies than expected from those movies' quality (the click rates the catalog's
  rating and votes predict), their own propensity to click and their other preferences (see
  `facet_effects`), old clicks fading as the user
  passes up what they used to click (`_recent_clicks`); each movie's prior mean for the
  user is the global one lifted, in logits, by the sampled preferences for its facets;
- the user's own evidence on the movie updates a Beta around that prior mean.
Each request draws for a few hundred candidates at once (the globally best, the best of the
user's favourite facet values, a random sample of everything); the slate is the best draws with
a mild penalty for piling up the same facets, and movies the user already opened go last.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from system.core import userstate
from system.core.arrays import ranges, sorted_set, unique
from system.core.catalog import Catalog
from system.core.policy_config import PolicyConfig

_EPS = 1e-6
DENSE_INCIDENCE_LIMIT = 2_000_000  # cells of the movie x facet matrix (16 MB as float64)
MAX_CLICK_RATE = 0.05  # clicks per impression a facet value is expected to earn, at most
REASON_LIFT = 0.3  # logits: a facet preference that clear is worth naming as the reason


@dataclass(frozen=True)
class UserView:
    """What a slate reads of a user: their movie rows by id (looked up only for the candidates),
    their facet rows on the catalog's dense indices, and the digest of their movie rows. All of
    it bounded by the catalog, not the history, except the lookups (logarithmic in it)."""

    movie_ids: np.ndarray  # the state's movie rows (sorted ids, movies not in the catalog too)
    movie_clicks: np.ndarray
    movie_seen: np.ndarray
    facet: np.ndarray
    facet_clicks: np.ndarray
    facet_seen: np.ndarray
    facet_since: np.ndarray  # impressions after the last click
    clicks: float  # on movies in the catalog
    seen: float
    facet_set: np.ndarray  # the facet sets (Catalog.facet_sets) of the movies the user touched
    facet_set_base: np.ndarray  # per set, the backfit's trials x prior click rate (see `digest`)

    @property
    def cold(self) -> bool:
        return not (len(self.movie_ids) or len(self.facet))


# A user's movie rows summed under one model (`Model.digest`): (the model's version, clicks and
# impressions on the catalog's movies, per facet set the backfit's base). A plain tuple of
# plain values, which the garbage collector stops tracking, as it does the users holding one.
Digest = tuple[int, float, float, np.ndarray]
_versions = itertools.count(1)


# What a shard answers per slate request: movie ids, best first, and a reason for each.
Picks = tuple[list[int], list[str]]


@dataclass(frozen=True)
class Slate:
    movies: np.ndarray  # dense movie indices, best first
    scores: np.ndarray  # sampled logits of the picks
    reasons: list[str]  # per pick, a few words on why (the API shows them)


class Model:
    """What all users share: catalog arrays and global (all users) posteriors, precomputed."""

    def __init__(
        self,
        catalog: Catalog,
        config: PolicyConfig | None = None,
        global_clicks: np.ndarray | None = None,
        global_seen: np.ndarray | None = None,
        previous: Model | None = None,
    ) -> None:
        """`global_clicks` / `global_seen` are dense counts: M movies, then F facets. `previous`:
        the model this one replaces (new popularity); users' digests summed under it stay good
        under this one when the catalog and the configuration are the same (see `digest`)."""
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
        # The click rates the users' digests weigh their trials with: the catalog's prior
        # (rating, votes), not popularity, so a digest outlives every popularity push (pushed every
        # few seconds, it would otherwise cost each user a pass over their history at their next
        # slate). A Digest names the version it was summed under.
        self.digest_rate, self.version = prior, next(_versions)
        if previous is not None and previous.catalog is catalog and previous.config == cfg:
            self.digest_rate, self.version = previous.digest_rate, previous.version
        self.by_mean = np.argsort(-self.movie_mean, kind="stable")
        self.popular = np.zeros(m, dtype=bool)
        self.popular[self.by_mean[: max(1, m // 50)]] = True  # the best 2%
        # Each facet's movies (the facet_movies CSR rows), best global mean first.
        rank = np.empty(m, dtype=np.int64)
        rank[self.by_mean] = np.arange(m)
        owner = np.repeat(np.arange(f), np.diff(catalog.facet_movies_ptr))
        self.facet_by_mean = catalog.facet_movies[np.lexsort((rank[catalog.facet_movies], owner))]
        self.facet_count = np.diff(catalog.movie_facets_ptr)
        # Movie x facet incidence as a dense matrix when it is small (a genre catalog: 10k x 21):
        # a matrix product then beats gathering CSR rows. Large facet sets (directors, cast) keep CSR.
        self.incidence: np.ndarray | None = None
        self.facet_set = np.zeros(m, dtype=np.int64)  # each movie's (Catalog.facet_sets), when dense
        self.set_incidence = np.zeros((min(m, 1), f))
        if m * f <= DENSE_INCIDENCE_LIMIT:
            self.incidence = np.zeros((m, f), dtype=np.float64)
            self.incidence[catalog.pair_movie, catalog.pair_facet] = 1.0
            self.facet_set, self.set_incidence = catalog.facet_sets

        # The share of the catalog carrying each facet value: what a user's clicks would land on
        # by chance, before their impressions tell what they were actually shown.
        self.facet_share = np.diff(catalog.facet_movies_ptr) / max(m, 1)
        weights = dict(cfg.facet_weights)
        kind_weight = np.array([weights.get(kind, cfg.other_facet_weight) for kind in catalog.facet_kinds] or [0.0])
        self.facet_weight = kind_weight[catalog.facet_kind] if f else np.zeros(0)
        self.typical_exposure = cfg.exposure_prior * float(self.movie_mean.mean()) if m else 0.0
        self.best_half = np.sort(self.by_mean[: cfg.candidates // 2])  # every request's first candidates
        cold = userstate.empty()
        self.cold_view = self._view(cold, self.digest(cold))  # a new user's, the same for all of them
        for column in vars(self.cold_view).values():
            if isinstance(column, np.ndarray):
                column.setflags(write=False)

    def view(self, state: np.ndarray, digest: Digest | None = None) -> UserView:
        """Map a user's sparse state (see `system.userstate`) onto the catalog; `digest`, this
        model's digest of the state when the caller keeps one (else it is summed here)."""
        if not len(state):
            return self.cold_view
        return self._view(state, digest if digest is not None and digest[0] == self.version else self.digest(state))

    def digest(self, state: np.ndarray) -> Digest:
        """Sum a user's movie rows for the policy: their clicks and impressions, and per facet set
        the backfit's base, max(impressions, clicks) x the movie's prior click rate (movies that
        share a facet set are interchangeable in the backfit, see `_backfit_expectations`).
        The one pass over a user's history; a shard keeps it and `add_to_digest` keeps it current."""
        movies = userstate.movies(state)
        mi = self.catalog.movie_index(movies[:, userstate.KEY])
        known = mi >= 0
        mi, clicks, seen = mi[known], movies[known, userstate.CLICKS], movies[known, userstate.IMPRESSIONS]
        base = np.bincount(
            self.facet_set[mi],
            weights=np.maximum(seen, clicks) * self.digest_rate[mi],
            minlength=len(self.set_incidence),
        )
        return self.version, float(clicks.sum()), float(seen.sum()), base

    def add_to_digest(self, digest: Digest, before: np.ndarray, after: np.ndarray) -> Digest:
        """`digest` with the changes of some movie rows: `before` and `after` (key, clicks, seen,
        since) rows of the same movies, before and after an apply (zeros before for new rows).
        The same as `digest` of the new state, to rounding."""
        mi = self.catalog.movie_index(after[:, userstate.KEY])
        known = mi >= 0
        mi, before, after = mi[known], before[known], after[known]
        c, s = userstate.CLICKS, userstate.IMPRESSIONS
        trials = np.maximum(after[:, s], after[:, c]) - np.maximum(before[:, s], before[:, c])
        base = digest[3]
        np.add.at(base, self.facet_set[mi], trials * self.digest_rate[mi])  # in place: the digest is the user's
        added = after - before
        return digest[0], digest[1] + float(added[:, c].sum()), digest[2] + float(added[:, s].sum()), base

    def _view(self, state: np.ndarray, digest: Digest) -> UserView:
        movies, facets = userstate.movies(state), userstate.facets(state)
        fi = self.catalog.facet_index(-facets[:, userstate.KEY])
        fk = fi >= 0
        base = digest[3]
        touched = np.flatnonzero(base)
        return UserView(
            movie_ids=movies[:, userstate.KEY],
            movie_clicks=movies[:, userstate.CLICKS],
            movie_seen=movies[:, userstate.IMPRESSIONS],
            facet=fi[fk],
            facet_clicks=facets[fk, userstate.CLICKS].astype(np.float64),
            facet_seen=facets[fk, userstate.IMPRESSIONS].astype(np.float64),
            facet_since=facets[fk, userstate.SINCE_CLICK].astype(np.float64),
            clicks=digest[1],
            seen=digest[2],
            facet_set=touched,
            facet_set_base=base[touched],
        )


def draw_slate(model: Model, user: UserView, limit: int, rng: np.random.Generator) -> Slate:
    """A slate of up to `limit` distinct movies, best first, by one Thompson draw per candidate."""
    cfg = model.config
    limit = min(limit, len(model.catalog.movies))
    if limit <= 0:
        return Slate(np.zeros(0, dtype=np.int64), np.zeros(0), [])
    posterior = preference_posterior(model, user)
    effect = facet_effects(model, user, rng, posterior)
    candidates = _candidates(model, effect, rng)
    logits = model.movie_logit[candidates]
    if user.clicks:  # else no facet preference yet: every effect is 0
        logits = logits + _lift(model, candidates, effect)
    mean = _sigmoid(logits)
    alpha = cfg.movie_strength * mean
    beta = cfg.movie_strength * (1.0 - mean)
    # The user's own evidence on the candidates they touched: a lookup per candidate (candidates
    # are sorted dense indices, so their ids are sorted too), not a pass over their history.
    clicked = np.zeros(0, dtype=np.int64)
    if len(user.movie_ids):
        ids = model.catalog.movie_ids[candidates]
        pos = np.minimum(np.searchsorted(user.movie_ids, ids), len(user.movie_ids) - 1)
        hit = np.flatnonzero(user.movie_ids[pos] == ids)
        clicks = user.movie_clicks[pos[hit]]
        alpha[hit] += clicks
        beta[hit] += user.movie_seen[pos[hit]]
        clicked = hit[clicks > 0]
    e = cfg.exploration  # Beta(a/e, b/e): the same mean, about e times the variance
    scores = _logit(rng.beta(alpha / e, beta / e))
    scores[clicked] -= cfg.clicked_penalty
    order = _diverse_top(model, candidates, scores, limit)
    picks = candidates[order]
    return Slate(picks, scores[order], reasons(model, picks, tastes(model, user, posterior)))


@dataclass(frozen=True)
class Tastes:
    """A user's facet preferences as the evidence has them, not as one request's draw: per facet
    value they clicked (dense indices), its clicks, the posterior mean of its logit lift (what the
    policy adds, on average, to its movies' prior) and a cautious lift, one posterior standard
    deviation lower: what the evidence supports even if the user was lucky to click."""

    facet: np.ndarray
    clicks: np.ndarray
    lift: np.ndarray
    cautious: np.ndarray

    @classmethod
    def none(cls) -> Tastes:
        empty = np.zeros(0)
        return cls(np.zeros(0, dtype=np.int64), empty, empty, empty)


def popular_slate(model: Model, limit: int, rng: np.random.Generator) -> Picks:
    """The slate of a user the system knows nothing of (no state): when the user's shard cannot
    answer, everyone gets it, as popularity (movie ids, best first, and a reason each)."""
    slate = draw_slate(model, model.cold_view, limit, rng)
    return model.catalog.movie_ids[slate.movies].tolist(), ["popular"] * len(slate.movies)


def reasons(model: Model, movies: np.ndarray, liked: Tastes | None = None) -> list[str]:
    """Why each movie is there, in a few words: a facet value of the movie the user clearly likes
    (clicked, with a cautious lift of at least REASON_LIFT), else that the movie is popular, else
    that it is new to them (the draw explored it). A claim to a person: from the evidence only."""
    catalog = model.catalog
    out = ["popular" if popular else "something new" for popular in model.popular[movies].tolist()]
    if liked is None or not len(liked.facet):
        return out
    clear = liked.cautious >= REASON_LIFT
    if not clear.any():
        return out  # no preference clear enough to name
    strength = np.full(len(catalog.facets), -np.inf)
    strength[liked.facet[clear]] = liked.cautious[clear]
    for i, movie in enumerate(movies.tolist()):
        facets = catalog.facets_of(movie)
        if len(facets) and np.isfinite(strength[facets].max()):
            out[i] = f"you like {catalog.facets[int(facets[int(strength[facets].argmax())])].name}"
    return out


Posterior = tuple[np.ndarray, np.ndarray]  # per touched facet value, Gamma (shape, rate) of the preference


def preference_posterior(model: Model, user: UserView) -> Posterior | None:
    """Per facet value the user touched (UserView.facet), the Gamma(shape, rate) posterior of
    their preference for it; None before their first click (every value at its prior).

    A user's preference for facet value g is how much more often their clicks land on g than
    chance would have it: clicks on g ~ Poisson(lambda_g * expected_g), where expected_g is the
    user's clicks times g's share of what they were exposed to. lambda_g has a Gamma(a, a)
    prior, mean 1 (indifferent), so its posterior is Gamma(a + clicks_g, a + expected_g).
    Clicks on a common genre (Drama) say little; on a rare one, much; many impressions of g
    without a click say "not g".

    Exposure is the user's impressions smoothed toward the catalog's shares with
    `exposure_prior` pseudo-impressions: clicks made while browsing the catalog are judged
    against the catalog, and a few slates shown afterwards do not undo them.
    """
    cfg = model.config
    clicks = user.clicks
    if not clicks:
        return None
    facet_clicks = _recent_clicks(cfg, user)
    # The user's propensity to click fades with the clicks it was learned from: judged against
    # all their clicks, every facet value would look passed up once old ones fade.
    if user.facet_clicks.sum() > 0:
        clicks *= facet_clicks.sum() / user.facet_clicks.sum()
    if cfg.backfit and model.incidence is not None:
        expected = _backfit_expectations(model, user, clicks, facet_clicks)
    else:
        exposure = (user.facet_seen + cfg.exposure_prior * model.facet_share[user.facet]) / (
            user.seen + cfg.exposure_prior
        )
        expected = clicks * exposure
    return cfg.facet_strength + facet_clicks, cfg.facet_strength + expected


def facet_effects(
    model: Model, user: UserView, rng: np.random.Generator, posterior: Posterior | None = None
) -> np.ndarray:
    """Per facet value (dense, all F), the logit lift of this request's Thompson draw of the
    user's preference for it (see `preference_posterior`; pass it if already computed)."""
    cfg = model.config
    effect = np.zeros(len(model.catalog.facets))
    if posterior is None:
        posterior = preference_posterior(model, user)
    if posterior is None:
        return effect  # no click yet: every facet value is at its prior, indifferent
    shape, rate = posterior
    e = cfg.exploration * cfg.taste_spread  # Gamma(k/e, e): mean k, variance k*e
    preference = rng.gamma(shape / e, e) / rate
    effect[user.facet] = _facet_lift(model, user.facet, preference)
    return effect


def tastes(model: Model, user: UserView, posterior: Posterior | None = None) -> Tastes:
    """The user's clicked facet values with their posterior lifts (see `Tastes`): what reasons,
    the admin profile and the demo's chart say the user likes. No randomness."""
    if posterior is None:
        posterior = preference_posterior(model, user)
    clicked = np.flatnonzero(user.facet_clicks > 0)
    if posterior is None or not len(clicked):
        return Tastes.none()
    shape, rate = posterior[0][clicked], posterior[1][clicked]
    mean, sd = shape / rate, np.sqrt(shape) / rate
    at = user.facet[clicked]
    return Tastes(
        at,
        user.facet_clicks[clicked],
        _facet_lift(model, at, mean),
        _facet_lift(model, at, np.maximum(mean - sd, _EPS)),
    )


def _facet_lift(model: Model, facets: np.ndarray, preference: np.ndarray) -> np.ndarray:
    """Preferences for facet values (1: indifferent) as the logit lifts they give their movies."""
    cfg = model.config
    lift: np.ndarray = np.clip(np.log(preference) * model.facet_weight[facets], -cfg.max_lift, cfg.max_lift)
    return lift


def _recent_clicks(cfg: PolicyConfig, user: UserView) -> np.ndarray:
    """Per touched facet value, the user's clicks on it, discounted by the evidence since their
    last one: `since` impressions at the user's click rate on it are the clicks they would have
    made had their taste stayed; each `forget_half_life` of those missed halves the old ones.
    A taste the user keeps acting on keeps its weight; one they stopped acting on fades, at the
    pace of the evidence rather than of the clock."""
    if cfg.forget_half_life <= 0:
        return user.facet_clicks
    # Clicks per impression, bounded: a slate gets at most one click, and clicks made from the
    # catalog list (no impression before them) must not make every later impression a miss.
    rate = np.minimum(user.facet_clicks / np.maximum(user.facet_clicks + user.facet_seen, 1.0), MAX_CLICK_RATE)
    recent: np.ndarray = user.facet_clicks * np.exp2(-user.facet_since * rate / cfg.forget_half_life)
    return recent


def _backfit_expectations(
    model: Model, user: UserView, clicks: float, facet_clicks: np.ndarray, iterations: int = 3
) -> np.ndarray:
    """Per touched facet value g, the clicks the user would have made on g's movies if g were
    neutral to them, given everything else we know: each movie's quality (its click rate as the
    catalog's rating and votes predict it), the user's own propensity to click, and their other
    facet preferences (so Drama is not credited with the clicks that Crime earned). A log-linear
    model,
        E[clicks on m] = trials_m * p_m * exp(b + sum over m's facet values g of w_g),
    fitted by a few rounds of iterative proportional fitting over the movies the user was shown
    or opened, plus `exposure_prior` pseudo-impressions of the catalog at its facet shares (what
    a user opening movies from the catalog list chose among). Movies with the same facet set
    have the same lift, so the fit runs over the user's facet sets, each with its movies'
    trials_m * p_m summed (the digest's base): its cost is bounded by the catalog's sets (about
    400 for genres), not by the user's history."""
    cfg = model.config
    a = cfg.facet_strength
    assert model.incidence is not None  # the caller checked: only small facet sets are backfitted
    base = user.facet_set_base
    member = model.set_incidence[user.facet_set][:, user.facet]  # facet sets x facets
    typical = model.typical_exposure
    prior = typical * model.facet_share[user.facet]  # the pseudo-catalog's movies of each facet
    w = np.zeros(len(user.facet))
    b = 0.0
    for _ in range(iterations):
        lift = np.exp(w)
        rate = base * np.exp(member @ w)
        total = rate.sum() + (prior * lift).sum() + typical
        b = np.log((a + clicks) / (a + total))
        expected = np.exp(b) * (rate @ member + prior * lift)
        w += np.log((a + facet_clicks) / (a + expected))
    lift = np.exp(w)
    neutral: np.ndarray = np.exp(b) * ((base * np.exp(member @ w)) @ member + prior * lift) / lift  # g itself neutral
    return neutral


def _lift(model: Model, movies: np.ndarray, effect: np.ndarray) -> np.ndarray:
    """Per movie, the sum of its facets' effects."""
    if model.incidence is not None:  # per facet set, then per movie: fewer rows than the candidates
        lifts: np.ndarray = (model.set_incidence @ effect)[model.facet_set[movies]]
        return lifts
    catalog = model.catalog
    starts = catalog.movie_facets_ptr[movies]
    lengths = catalog.movie_facets_ptr[movies + 1] - starts
    owner = np.repeat(np.arange(len(movies)), lengths)
    return np.bincount(owner, weights=effect[catalog.pair_facet[ranges(starts, lengths)]], minlength=len(movies))


def _candidates(model: Model, effect: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The movies worth a draw this request (sorted dense indices): the globally best, the best
    and some random others of the user's favourite facet values, and a random sample of the
    whole catalog so that every movie keeps a chance. A small catalog is all candidates."""
    cfg, n = model.config, len(model.catalog.movies)
    if n <= cfg.candidates:
        return np.arange(n)
    parts: list[np.ndarray] = [model.best_half, rng.integers(0, n, cfg.candidates // 8)]
    liked = np.flatnonzero(effect > 0)
    if len(liked):
        liked = liked[np.argsort(-effect[liked])[: cfg.favourite_facets]]
        per = max(cfg.candidates // (4 * len(liked)), 1)
        starts = model.catalog.facet_movies_ptr[liked]
        lengths = model.catalog.facet_movies_ptr[liked + 1] - starts
        best = ranges(starts, np.minimum(lengths, per))
        some = np.repeat(starts, per) + (rng.random(len(liked) * per) * np.repeat(lengths, per)).astype(np.int64)
        parts += [model.facet_by_mean[best], model.facet_by_mean[some]]
    return sorted_set(np.concatenate(parts))  # a sort of a few hundred, not a pass over the catalog


def _diverse_top(model: Model, candidates: np.ndarray, scores: np.ndarray, limit: int) -> np.ndarray:
    """Positions (into `candidates`) of the slate. Greedy: the best score first, then each next
    pick pays `diversity` logits per earlier pick sharing its facets (averaged over its facets)."""
    cfg, catalog = model.config, model.catalog
    size = min(len(scores), limit * cfg.pool_factor)
    pool = np.argpartition(-scores, size - 1)[:size]
    pool = pool[np.argsort(-scores[pool], kind="stable")]
    if cfg.diversity <= 0 or not len(catalog.facets):
        return pool[:limit]
    movies = candidates[pool]
    if model.incidence is not None:
        member = model.incidence[movies]
    else:
        starts = catalog.movie_facets_ptr[movies]
        lengths = catalog.movie_facets_ptr[movies + 1] - starts
        local, inverse = unique(catalog.pair_facet[ranges(starts, lengths)])
        member = np.zeros((size, len(local)))
        member[np.repeat(np.arange(size), lengths), inverse] = 1.0
    # penalty[i, j]: what candidate i pays once j is picked.
    penalty = (member * (cfg.diversity / np.maximum(model.facet_count[movies], 1))[:, None]) @ member.T
    adjusted = scores[pool].copy()
    order = np.empty(limit, dtype=np.int64)
    for k in range(limit):
        j = int(np.argmax(adjusted))
        order[k] = j
        adjusted -= penalty[:, j]
        adjusted[j] = -np.inf
    return pool[order]


def _zscore(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    ok = np.isfinite(x)
    if ok.sum() < 2:
        return np.zeros_like(x)
    std = x[ok].std()
    z = (x - x[ok].mean()) / (std if std > 0 else 1.0)
    return np.where(ok, z, 0.0)


def _logit(p: np.ndarray | float) -> np.ndarray:
    q = np.clip(p, _EPS, 1.0 - _EPS)
    logits: np.ndarray = np.log(q) - np.log1p(-q)
    return logits


def _sigmoid(x: np.ndarray) -> np.ndarray:
    probabilities: np.ndarray = 1.0 / (1.0 + np.exp(-x))
    return probabilities
