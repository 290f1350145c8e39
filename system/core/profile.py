"""What the system learned about one user, as the admin profile shows it: the Beta posterior of
every movie and facet value they touched (alpha = 1 + clicks, beta = 1 + impressions, the
original service's update), the facet values they like best as the policy weighs them (their
lift, policy.Tastes), and their last slate with why each movie was in it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from system.core.catalog import Catalog

TOP_FACETS = 10
TASTE_MEASURE = (
    "top_facets: the facet values the user clicked, ranked by cautious lift. lift is how much the"
    " policy raises their movies' odds for this user, in logits (the posterior mean: their clicks on"
    " it against what its movies' quality and share of their slates predict); cautious_lift is one"
    " posterior standard deviation lower, what the evidence supports even if some clicks were luck."
)


@dataclass(frozen=True)
class UserProfile:
    rows: list[list[int]]  # the user's state rows (system/core/userstate.py)
    tastes: list[tuple[int, int, float, float]]  # (facet id, clicks, lift, cautious lift), best first
    last_slate: tuple[float, list[int], list[str]] | None  # (when, movie ids, reasons), if remembered

    @classmethod
    def from_wire(cls, answer: dict[str, Any]) -> UserProfile:
        """As a shard answers (actors/shard.py `user_counts`), over NATS or Ray."""
        last = answer.get("last_slate")
        tastes = [(int(f), int(c), float(m), float(lo)) for f, c, m, lo in answer.get("tastes", [])]
        return cls(answer["rows"], tastes, (float(last[0]), list(last[1]), list(last[2])) if last else None)


def _posterior(clicks: int, seen: int) -> dict[str, Any]:
    alpha, beta = 1 + clicks, 1 + seen
    return {"alpha": alpha, "beta": beta, "mean": round(alpha / (alpha + beta), 4)}


def describe(uxid: str, profile: UserProfile, catalog: Catalog) -> dict[str, Any]:
    """The admin profile of a user (GET /api/profile)."""
    movies, facets = [], []
    lifts = {facet: (lift, cautious) for facet, _, lift, cautious in profile.tastes}
    for key, clicks, seen, *_ in profile.rows:
        if key > 0:
            index = int(catalog.movie_index([key])[0])
            name = catalog.movies[index].name if index >= 0 else None
            movies.append({"id": key, "name": name, "clicks": clicks, "impressions": seen, **_posterior(clicks, seen)})
        else:
            index = int(catalog.facet_index([-key])[0])
            facet = catalog.facets[index] if index >= 0 else None
            facets.append(
                {
                    "kind": facet and facet.kind,
                    "id": -key,
                    "name": facet and facet.name,
                    "clicks": clicks,
                    "impressions": seen,
                    **_posterior(clicks, seen),
                    "lift": lifts.get(-key, (None, None))[0],
                    "cautious_lift": lifts.get(-key, (None, None))[1],
                }
            )
    rank = {facet: i for i, (facet, *_) in enumerate(profile.tastes)}
    top = sorted((f for f in facets if f["id"] in rank), key=lambda f: rank[f["id"]])[:TOP_FACETS]
    last = None
    if profile.last_slate is not None:
        at, ids, reasons = profile.last_slate
        found = catalog.movie_index(ids).tolist()
        last = {
            "at": at,
            "movies": [
                {"id": i, "name": catalog.movies[int(x)].name if x >= 0 else None, "reason": r}
                for i, x, r in zip(ids, found, reasons, strict=True)
            ],
        }
    return {
        "uxid": uxid,
        "clicks": sum(m["clicks"] for m in movies),
        "impressions": sum(m["impressions"] for m in movies),
        "top_facets": top,
        "measure": TASTE_MEASURE,
        "last_slate": last,
        "movies": movies,
        "facets": facets,
    }
