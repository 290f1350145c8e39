"""Properties of the two parsers that take outside input (Hypothesis): the event decoder, which
every event from HTTP and NATS goes through, and the catalog loader. Whatever they are given, they
answer with a result that keeps the rules of system/core/inputs.py, or with the error they
document: never another exception, never a half-accepted batch."""

from __future__ import annotations

import csv
import gzip
import io
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from system.core.catalog import Movie
from system.core.catalog_file import read_movies
from system.core.errors import BadRequest, MalformedEvent
from system.core.events import MAX_BATCH, Event, decode, parse_event, redact
from system.core.inputs import MAX_MOVIE_ID, TS_MAX, TS_MIN, movie_id, user_id

KNOWN = frozenset(range(1, 60))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
user_ids = st.text(min_size=1, max_size=128).filter(lambda u: _valid(user_id, u))
movie_ids = st.integers(1, 59)
events = st.fixed_dictionaries(
    {
        "event_type": st.sampled_from(["seen", "clicked"]),
        "user_id": user_ids,
        "entity_ids": st.lists(movie_ids, min_size=1, max_size=10, unique=True),
    },
    optional={
        "entity_type": st.just("movies"),
        "event_id": st.text(min_size=1, max_size=128),
        "ts": st.floats(TS_MIN, TS_MAX, exclude_max=True),
    },
)
# Events as producers get them wrong: valid ones, with a field replaced by anything at all.
mangled = st.one_of(
    events,
    st.tuples(
        events, st.sampled_from(["event_type", "user_id", "entity_ids", "entity_id", "ts", "event_id"]), json_values
    ).map(lambda t: {**t[0], t[1]: t[2]}),
    json_values,
)


def _valid(check: Any, value: Any) -> bool:
    try:
        check(value)
    except BadRequest:
        return False
    return True


def _keeps_the_rules(event: Event) -> None:
    assert user_id(event.user) == event.user
    assert event.movies and len(set(event.movies)) == len(event.movies)
    assert all(type(m) is int and 0 < m <= MAX_MOVIE_ID for m in event.movies)
    assert event.ts is None or TS_MIN - 86_400 <= event.ts < TS_MAX + 86_400  # (an ISO offset shifts it a day at most)


@given(st.binary(max_size=512))
def test_any_bytes_decode_to_events_or_problems_never_an_exception(payload: bytes) -> None:
    decoded, problems = decode(payload, "m-1", KNOWN)
    assert not (decoded and problems)


@given(st.lists(mangled, max_size=8), st.booleans())
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_a_batch_is_all_or_nothing_and_what_it_accepts_keeps_the_rules(items: list[Any], single: bool) -> None:
    sent = items[0] if single and items else items  # one event alone, or a batch
    decoded, problems = decode(orjson.dumps(sent), "m-1", KNOWN)
    if problems:
        assert decoded == [] and all(p.label in {"invalid", "unknown_movie", "not_json", "too_large"} for p in problems)
        return
    assert len(decoded) == len(sent if isinstance(sent, list) else [sent])
    for i, event in enumerate(decoded):
        _keeps_the_rules(event)
        assert set(event.movies) <= KNOWN
        assert event.event_id is not None and (event.event_id == f"m-1#{i}" or len(event.event_id) <= 128)


@given(mangled)
def test_an_event_parses_or_says_why(item: Any) -> None:
    try:
        event = parse_event(item)
    except MalformedEvent as exc:
        assert exc.detail
        return
    _keeps_the_rules(event)
    assert parse_event(event.to_json()) == event  # what it accepts, it writes back alike


@given(st.lists(events, min_size=1, max_size=8), st.data())
def test_redacting_a_user_leaves_the_others_events_as_they_were(
    batch: list[dict[str, Any]], data: st.DataObject
) -> None:
    gone = data.draw(st.sampled_from([e["user_id"] for e in batch]))
    payload = orjson.dumps(batch)
    before, _ = decode(payload, "m-2", KNOWN)
    redacted = redact(payload, "m-2", gone)
    assert redacted is not None
    after, problems = decode(redacted, None, KNOWN)
    assert not problems and after == [e for e in before if e.user != gone]


def test_a_batch_past_the_limit_is_refused_whole() -> None:
    one = {"event_type": "seen", "user_id": "u", "entity_id": 1}
    assert decode(orjson.dumps([one] * (MAX_BATCH + 1)), None, KNOWN)[1][0].label == "too_large"


# --- the catalog loader ------------------------------------------------------------------------


@given(
    st.lists(
        json_values
        | st.dictionaries(st.sampled_from(["id", "title", "genres", "rating", "votes", "director"]), json_values),
        max_size=5,
    )
)
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=150)
def test_any_jsonl_loads_movies_that_keep_the_rules_or_names_the_line(tmp_path: Path, rows: list[Any]) -> None:
    path = tmp_path / "catalog.jsonl"
    path.write_bytes(b"\n".join(orjson.dumps(r) for r in rows))
    _load_or_refuse(path)


@given(st.lists(st.lists(st.text(max_size=12), min_size=4, max_size=4), max_size=5))
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=150)
def test_any_csv_loads_movies_that_keep_the_rules_or_names_the_line(tmp_path: Path, rows: list[list[str]]) -> None:
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["id", "title", "genres", "rating"])
    writer.writerows(rows)
    path = tmp_path / "catalog.csv.gz"
    path.write_bytes(gzip.compress(text.getvalue().encode()))
    _load_or_refuse(path)


def _load_or_refuse(path: Path) -> None:
    try:
        movies = list(read_movies(path))
    except BadRequest as exc:
        assert exc.detail.startswith("line ")
        return
    for movie in movies:
        assert isinstance(movie, Movie) and movie_id(str(movie.id)) == movie.id
        assert movie.name == movie.name.strip() and movie.name
        assert movie.rating is None or movie.rating == movie.rating  # a number, not NaN
        assert all(isinstance(n, str) and n for names in movie.facets.values() for n in names)


@pytest.mark.parametrize("raw", ["+2", " 2", "1_0", "0002", "2.5", "true", "٢"])
def test_a_catalog_movie_id_is_plain_digits_as_everywhere(tmp_path: Path, raw: str) -> None:
    path = tmp_path / "c.csv"
    path.write_text(f"id,title\n{raw},A film\n")
    with pytest.raises(BadRequest, match="line 2: id"):
        list(read_movies(path))
