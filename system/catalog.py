"""The movie catalog: reading a user's CSV/JSONL file, and the in-memory arrays the policy scores.

A file has one movie per row/line. Known scalar columns: id, title (or name), description, rating,
votes, runtime_min (or duration), imdb_id, link. Every other column is a facet: `|`-separated
values in CSV, a list (or a `|`-separated string) in JSONL. Facet kinds are plural names as the
API shows them: genre/genres -> genres, director(s) -> directors, cast/actor(s) -> actors.
"""

from __future__ import annotations

import csv
import gzip
import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import orjson

from system.errors import BadRequest

KIND_ALIASES = {
    "genre": "genres",
    "director": "directors",
    "cast": "actors",
    "actor": "actors",
    "keyword": "keywords",
    "writer": "writers",
}
# Facet kinds every movie shows in the API, even when empty (the original service's shape).
STANDARD_KINDS = ("genres", "directors", "actors")
SCALARS = {
    "id",
    "title",
    "name",
    "description",
    "rating",
    "votes",
    "runtime_min",
    "duration",
    "duration_unit",
    "imdb_id",
    "link",
}
MAX_FACETS_PER_KIND = 64


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


def open_text(path: Path) -> IO[str]:
    raw: IO[bytes] = gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")
    return io.TextIOWrapper(raw, encoding="utf-8", newline="")


def read_movies(path: Path) -> Iterator[Movie]:
    """Movies from a .csv or .jsonl file (optionally .gz). Raises BadRequest naming the line."""
    stem = path.name.removesuffix(".gz")
    with open_text(path) as text:
        if stem.endswith(".csv"):
            reader = csv.DictReader(text)
            for row in reader:
                yield _movie(row, reader.line_num, split_lists=True)
        elif stem.endswith((".jsonl", ".ndjson")):
            for number, line in enumerate(text, start=1):
                if line.strip():
                    try:
                        row = orjson.loads(line)
                    except orjson.JSONDecodeError as exc:
                        raise BadRequest(f"line {number}: not JSON: {exc}") from None
                    if not isinstance(row, dict):
                        raise BadRequest(f"line {number}: expected a JSON object")
                    yield _movie(row, number, split_lists=False)
        else:
            raise BadRequest(f"{path.name}: expected a .csv or .jsonl file (optionally .gz)")


def _movie(row: dict[str, Any], line: int, *, split_lists: bool) -> Movie:
    def fail(message: str) -> BadRequest:
        return BadRequest(f"line {line}: {message}")

    def number(key: str, cast: type) -> Any:
        value = row.get(key)
        if value is None or value == "":
            return None
        try:
            return cast(value)
        except (TypeError, ValueError):
            raise fail(f"{key} must be a number, got {value!r}") from None

    movie_id = number("id", int)
    if movie_id is None or not 0 < movie_id < 2**31:
        raise fail(f"id must be a positive 32-bit integer, got {row.get('id')!r}")
    name = str(row.get("title") or row.get("name") or "").strip()
    if not name:
        raise fail("title (or name) is required")
    facets: dict[str, list[str]] = {}
    for column, value in row.items():
        if column is None or column.lower() in SCALARS or value in (None, ""):
            continue
        kind = KIND_ALIASES.get(column.strip().lower(), column.strip().lower())
        names = value.split("|") if isinstance(value, str) else value
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise fail(f"{column} must be a list of strings or a |-separated string")
        cleaned = list(dict.fromkeys(n.strip() for n in names if n.strip()))
        if len(cleaned) > MAX_FACETS_PER_KIND:
            raise fail(f"{column} has {len(cleaned)} values; at most {MAX_FACETS_PER_KIND}")
        if cleaned:
            facets.setdefault(kind, []).extend(cleaned)
    imdb_id = str(row.get("imdb_id") or "").strip() or None
    link = str(row.get("link") or "").strip() or (f"https://www.imdb.com/title/{imdb_id}/" if imdb_id else None)
    duration = number("runtime_min", int)
    if duration is None:
        duration = number("duration", int)
    return Movie(
        id=movie_id,
        name=name,
        description=str(row.get("description") or ""),
        rating=number("rating", float),
        votes=number("votes", int),
        duration=duration,
        duration_unit=str(row.get("duration_unit") or "min"),
        link=link,
        imdb_id=imdb_id,
        facets=facets,
    )


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
