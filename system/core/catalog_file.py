"""Reading a catalog file: CSV or JSONL (optionally .gz), one movie per row/line.

Known scalar columns: id, title (or name), description, rating, votes, runtime_min (or duration),
imdb_id, link. Every other column is a facet: `|`-separated values in CSV, a list (or a
`|`-separated string) in JSONL. Facet kinds are plural names as the API shows them:
genre/genres -> genres, director(s) -> directors, cast/actor(s) -> actors.
"""

from __future__ import annotations

import csv
import gzip
import io
import math
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import orjson

from system.core.catalog import Movie
from system.core.errors import BadRequest
from system.core.inputs import movie_id, movie_id_value

# The catalog mabrec ships and loads on first start (data/README.md).
SHIPPED = Path(__file__).resolve().parents[2] / "data" / "catalog.csv.gz"

KIND_ALIASES = {
    "genre": "genres",
    "director": "directors",
    "cast": "actors",
    "actor": "actors",
    "keyword": "keywords",
    "writer": "writers",
}
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


def open_text(path: Path) -> IO[str]:
    raw = gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")  # the wrapper closes it
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
            parsed = cast(value)
        except (TypeError, ValueError, OverflowError):
            raise fail(f"{key} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not math.isfinite(parsed):
            raise fail(f"{key} must be a number, got {value!r}")
        return parsed

    raw_id = row.get("id")  # a string in CSV; a number (or a string) in JSONL: the one rule either way
    try:
        movie = movie_id(raw_id) if isinstance(raw_id, str) else movie_id_value(raw_id)
    except BadRequest:
        movie = None
    if movie is None:
        raise fail(f"id must be a positive 32-bit integer in plain digits, got {raw_id!r}")
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
        id=movie,
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
