from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from system.core.catalog import Catalog
from system.core.catalog_file import SHIPPED, read_movies
from system.core.errors import BadRequest
from tests.conftest import SMALL_CSV, SMALL_JSONL


def test_shipped_catalog_reads_completely() -> None:
    movies = list(read_movies(SHIPPED))
    assert len(movies) == 9634
    first = movies[0]
    assert (first.id, first.name, first.rating, first.votes, first.duration) == (
        1,
        "The Shawshank Redemption",
        9.3,
        2752419,
        142,
    )
    assert first.link == "https://www.imdb.com/title/tt0111161/" and first.facets == {"genres": ["Drama"]}
    assert len({g for m in movies for g in m.facets["genres"]}) == 21


def test_csv_with_directors() -> None:
    movies = {m.id: m for m in read_movies(SMALL_CSV)}
    assert movies[14].facets == {"genres": ["Action", "Sci-Fi"], "directors": ["Lana Wachowski", "Lilly Wachowski"]}


def test_jsonl_with_lists_aliases_and_extra_facets() -> None:
    movies = {m.id: m for m in read_movies(SMALL_JSONL)}
    heat = movies[100001]
    assert heat.facets == {
        "genres": ["Action", "Crime", "Drama"],
        "directors": ["Michael Mann"],
        "actors": ["Al Pacino", "Robert De Niro"],
        "keywords": ["heist", "los angeles"],
    }
    assert movies[100002].name == "Collateral" and movies[100002].facets["directors"] == ["Michael Mann"]
    assert movies[100003].rating is None


@pytest.mark.parametrize(
    ("content", "suffix", "says"),
    [
        ("id,title\nx,Movie\n", ".csv", "line 2: id must be"),
        ("id,title\n5,\n", ".csv", "title"),
        ("id,title,rating\n5,M,great\n", ".csv", "rating must be a number"),
        ('{"id": 1, "title": "A"}\nnot json\n', ".jsonl", "line 2: not JSON"),
        ('{"id": 1, "title": "A", "genres": [1, 2]}\n', ".jsonl", "genres must be"),
        ("whatever", ".txt", "expected a .csv or .jsonl"),
    ],
)
def test_bad_files_name_the_line(tmp_path: Path, content: str, suffix: str, says: str) -> None:
    path = tmp_path / f"catalog{suffix}"
    path.write_text(content)
    with pytest.raises(BadRequest, match=says):
        list(read_movies(path))


def test_catalog_arrays() -> None:
    catalog = Catalog.from_movies(list(read_movies(SMALL_CSV)))
    assert len(catalog) == 40 and catalog.movie_index([14, 999, 1]).tolist() == [13, -1, 0]
    matrix = catalog.facet_names(13)
    assert [f.name for f in matrix["directors"]] == ["Lana Wachowski", "Lilly Wachowski"]
    assert [f.name for f in matrix["genres"]] == ["Action", "Sci-Fi"]
    nolan = next(i for i, f in enumerate(catalog.facets) if f.name == "Christopher Nolan")
    assert sorted(catalog.movie_ids[catalog.movies_of(nolan)].tolist()) == [3, 12, 18, 32]
    # Both incidence directions agree.
    pairs_by_movie = {(int(m), int(f)) for m, f in zip(catalog.pair_movie, catalog.pair_facet, strict=False)}
    pairs_by_facet = {(int(m), j) for j in range(len(catalog.facets)) for m in catalog.movies_of(j)}
    assert pairs_by_movie == pairs_by_facet
    assert np.all(np.diff(catalog.movie_ids) > 0)
