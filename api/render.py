"""Movies as JSON, in the original service's shape, serialized once per catalog version."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson

from system.core.catalog import STANDARD_KINDS, Catalog


def movie_json(catalog: Catalog, index: int) -> dict[str, Any]:
    movie = catalog.movies[index]
    out: dict[str, Any] = {
        "id": movie.id,
        "name": movie.name,
        "description": movie.description,
        "rating": movie.rating,
        "votes": movie.votes,
        "duration": movie.duration,
        "duration_unit": movie.duration_unit,
        "link": movie.link,
    }
    facets = catalog.facet_names(index)
    for kind in (*STANDARD_KINDS, *sorted(set(facets) - set(STANDARD_KINDS))):
        out[kind] = [{"id": f.id, "name": f.name} for f in facets.get(kind, [])]
    return out


class Rendered:
    """A catalog with every movie pre-serialized: a response is a join of byte strings."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self._json = [orjson.dumps(movie_json(catalog, i)) for i in range(len(catalog))]
        self._by_id = {m.id: j for m, j in zip(catalog.movies, self._json, strict=True)}

    def one(self, index: int) -> bytes:
        return self._json[index]

    def many(self, indices: Iterable[int]) -> bytes:
        return b"[" + b",".join(self._json[i] for i in indices) + b"]"

    def by_ids(self, ids: Iterable[int], reasons: Iterable[str] | None = None) -> bytes:
        """The movies with these ids, in this order (ids not in the catalog are left out), each
        with its `reason` when given."""
        by_id = self._by_id
        if reasons is None:
            return b"[" + b",".join(by_id[i] for i in ids if i in by_id) + b"]"
        items = (
            b'{"reason":' + orjson.dumps(r) + b"," + by_id[i][1:]
            for i, r in zip(ids, reasons, strict=True)
            if i in by_id
        )
        return b"[" + b",".join(items) + b"]"
