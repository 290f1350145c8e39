"""What the system learned about one user, as the admin profile shows it: the Beta posterior of
every movie and facet value they touched (alpha = 1 + clicks, beta = 1 + impressions, the
original service's update), the facet values they like best, and their last slate with why each
movie was in it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from system.core.catalog import Catalog

TOP_FACETS = 10


@dataclass(frozen=True)
class UserProfile:
    rows: list[list[int]]  # the user's state rows (system/core/userstate.py)
    last_slate: tuple[float, list[int], list[str]] | None  # (when, movie ids, reasons), if remembered

    @classmethod
    def from_wire(cls, answer: dict[str, Any]) -> UserProfile:
        """As a shard answers (actors/shard.py `user_counts`), over NATS or Ray."""
        last = answer.get("last_slate")
        return cls(answer["rows"], (float(last[0]), list(last[1]), list(last[2])) if last else None)


def _posterior(clicks: int, seen: int) -> dict[str, Any]:
    alpha, beta = 1 + clicks, 1 + seen
    return {"alpha": alpha, "beta": beta, "mean": round(alpha / (alpha + beta), 4)}


def describe(uxid: str, profile: UserProfile, catalog: Catalog) -> dict[str, Any]:
    """The admin profile of a user (GET /api/profile)."""
    movies, facets = [], []
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
                }
            )
    # Best first by posterior mean; among equals, the better known (more impressions).
    top = sorted(facets, key=lambda f: (-f["mean"], -f["impressions"], f["id"]))[:TOP_FACETS]
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
        "last_slate": last,
        "movies": movies,
        "facets": facets,
    }
