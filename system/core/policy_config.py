"""The bandit policy's configuration: an immutable value, free of numpy so that Settings can
take its defaults from here."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PolicyConfig:
    # Tuned with `mabrec simulate` (docs/simulation/README.md): each value is the best of those tried.
    base_rate: float = 0.03  # prior click rate of an average movie, clicks / (clicks + impressions)
    rating_weight: float = 0.8  # logit shift per standard deviation of catalog rating
    votes_weight: float = 0.4  # logit shift per standard deviation of log(votes)
    global_movie_strength: float = 5.0  # pseudo-counts of the catalog prior in a movie's global posterior
    movie_strength: float = 50.0  # pseudo-counts of a user's movie prior: lower explores more
    facet_strength: float = 1.5  # Gamma prior shape/rate of a facet preference (in expected clicks)
    exposure_prior: float = 200.0
    backfit: bool = True  # facet preferences net of movie quality and of other facets (_backfit_expectations)
    max_lift: float = 3.0  # bound, in logits, of one facet value's effect on a movie
    facet_weights: tuple[tuple[str, float], ...] = (("genres", 2.0), ("directors", 1.5), ("actors", 1.0))
    other_facet_weight: float = 1.0
    diversity: float = 0.1  # logit penalty per earlier pick sharing a movie's facets (on average)
    clicked_penalty: float = 1e3  # logits: movies the user already opened go to the back of the line
    pool_factor: int = 3  # the diversity re-rank looks at limit * pool_factor best draws
    candidates: int = 400  # movies drawn per request, about (see _candidates)
    favourite_facets: int = 4  # the user's facet values whose movies join the candidates
    # Tastes shift: a facet value's clicks halve each time the user passes up, since their last
    # click on it, as many of its movies as they would have been expected to click this many
    # times (`_recent_clicks`). 0 keeps every click forever.
    forget_half_life: float = 4.0
    # Scales the spread of every Thompson draw, keeping its mean: below 1 exploits what is
    # known sooner, above 1 keeps trying more (MABREC_EXPLORATION). Sharpened posteriors did
    # better in the simulator (+5% clicks at 0.5, +8% at 0.25, docs/simulation); 0.5 keeps
    # some of the exploration a catalog prior less true than our world's may need.
    exploration: float = 0.5
    # Scales the spread of the facet preferences' draws on top of `exploration`: the movies' own
    # draws keep exploring, while a user's clear tastes hold from one slate to the next instead
    # of swinging with each draw (docs/simulation: slate-to-slate coherence).
    taste_spread: float = 0.25
