"""The movie catalog as the policy scores it: movies and facet values (genres, directors, ...)
in arrays sorted by id, with the movie <-> facet incidence both ways. Reading a user's catalog
file is in `catalog_file.py`."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

# Facet kinds every movie shows in the API, even when empty (the original service's shape).
STANDARD_KINDS = ("genres", "directors", "actors")


@dataclass(frozen=True)
class Movie:
    id: int
    name: str
    description: str = ""
    rating: float | None = None
    votes: int | None = None
    duration: int | None = None
    duration_unit: str = "min"
    link: str | None = None
    imdb_id: str | None = None
    facets: dict[str, list[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Facet:
    id: int
    kind: str
    name: str


class Catalog:
    """Movies and facets as arrays, sorted by id, with the movie<->facet incidence both ways.

    Dense indices: movie i in [0, M), facet j in [0, F). `movie_facets` (CSR over movies) lists
    facet indices per movie; `facet_movies` (CSR over facets) lists movie indices per facet.
    """

    def __init__(
        self, movies: list[Movie], facets: list[Facet], links: list[tuple[int, int, int]], version: int = 0
    ) -> None:
        """`links` are (movie id, facet id, position): a movie's facets in the order its file gave."""
        self.version = version
        self.movies = sorted(movies, key=lambda m: m.id)
        self.facets = sorted(facets, key=lambda f: f.id)
        self.movie_ids = np.array([m.id for m in self.movies], dtype=np.int32)
        self.id_set = frozenset(m.id for m in self.movies)
        self.facet_ids = np.array([f.id for f in self.facets], dtype=np.int32)
        self.facet_kinds = sorted({f.kind for f in self.facets})
        self.facet_kind = np.array([self.facet_kinds.index(f.kind) for f in self.facets], dtype=np.int16)
        self.rating = np.array([np.nan if m.rating is None else m.rating for m in self.movies], dtype=np.float64)
        self.votes = np.array([0 if m.votes is None else m.votes for m in self.movies], dtype=np.float64)

        pairs = np.array(links, dtype=np.int64).reshape(-1, 3)
        mi = self.movie_index(pairs[:, 0])
        fi = self.facet_index(pairs[:, 1])
        keep = (mi >= 0) & (fi >= 0)
        mi, fi, position = mi[keep], fi[keep], pairs[keep, 2]
        by_movie = np.lexsort((position, mi))
        self.pair_movie = mi[by_movie].astype(np.int32)
        self.pair_facet = fi[by_movie].astype(np.int32)
        self.movie_facets_ptr = np.searchsorted(self.pair_movie, np.arange(len(self.movies) + 1)).astype(np.int64)
        by_facet = np.lexsort((self.pair_movie, self.pair_facet))
        self.facet_movies = self.pair_movie[by_facet]
        self.facet_movies_ptr = np.searchsorted(self.pair_facet[by_facet], np.arange(len(self.facets) + 1)).astype(
            np.int64
        )

    @classmethod
    def from_movies(cls, movies: list[Movie], version: int = 0) -> Catalog:
        """A catalog straight from movie records, facet ids numbered in order of appearance
        (the database assigns its own; this serves tests and the offline simulator)."""
        ids: dict[tuple[str, str], int] = {}
        links = []
        for movie in movies:
            for kind, names in movie.facets.items():
                for position, name in enumerate(names):
                    links.append((movie.id, ids.setdefault((kind, name), len(ids) + 1), position))
        facets = [Facet(id=i, kind=kind, name=name) for (kind, name), i in ids.items()]
        return cls(movies, facets, links, version)

    def __len__(self) -> int:
        return len(self.movies)

    def movie_index(self, ids: np.ndarray | list[int]) -> np.ndarray:
        """Dense index of each movie id, -1 where the id is not in the catalog."""
        return _lookup(self.movie_ids, ids)

    def facet_index(self, ids: np.ndarray | list[int]) -> np.ndarray:
        """Dense index of each facet id, -1 where the id is not in the catalog."""
        return _lookup(self.facet_ids, ids)

    def facets_of(self, movie: int) -> np.ndarray:
        return self.pair_facet[self.movie_facets_ptr[movie] : self.movie_facets_ptr[movie + 1]]

    def movies_of(self, facet: int) -> np.ndarray:
        return self.facet_movies[self.facet_movies_ptr[facet] : self.facet_movies_ptr[facet + 1]]

    def facet_ids_by_movie(self) -> dict[int, list[int]]:
        """Movie id -> the ids of its facet values, in plain Python (for the reference recount)."""
        return {int(self.movie_ids[i]): self.facet_ids[self.facets_of(i)].tolist() for i in range(len(self.movies))}

    @cached_property
    def facet_sets(self) -> tuple[np.ndarray, np.ndarray]:
        """The distinct sets of facet values movies carry (a genre catalog of 10,000 movies has
        about 400): (each movie's set, each set as a row of a sets x facets 0/1 matrix). Built on
        first use, densely: callers use it only where movies x facets is small."""
        if not len(self.facets):  # one set, the empty one
            return np.zeros(len(self.movies), dtype=np.int64), np.zeros((min(len(self.movies), 1), 0))
        member = np.zeros((len(self.movies), len(self.facets)), dtype=bool)
        member[self.pair_movie, self.pair_facet] = True
        packed = np.packbits(member, axis=1)  # a row as bytes: one sort key per movie
        rows = np.ascontiguousarray(packed).view(np.dtype((np.void, packed.shape[1]))).ravel()
        _, first, movie_set = np.unique(rows, return_index=True, return_inverse=True)
        return movie_set.astype(np.int64), member[first].astype(np.float64)

    def facet_names(self, movie: int) -> dict[str, list[Facet]]:
        out: dict[str, list[Facet]] = {}
        for j in self.facets_of(movie):
            facet = self.facets[j]
            out.setdefault(facet.kind, []).append(facet)
        return out


def _lookup(sorted_ids: np.ndarray, ids: np.ndarray | list[int]) -> np.ndarray:
    ids = np.asarray(ids, dtype=np.int64)
    if not len(sorted_ids):
        return np.full(ids.shape, -1, dtype=np.int64)
    pos = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
    return np.where(sorted_ids[pos] == ids, pos, -1)
