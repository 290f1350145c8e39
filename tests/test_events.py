from __future__ import annotations

import time

import orjson
import pytest

from system.core.errors import BadRequest, MalformedEvent
from system.core.events import CLICKED, MAX_BATCH, SEEN, Event, decode, parse_event, redact
from system.core.inputs import movie_id, timestamp, user_id, user_id_header


def test_original_shape_is_accepted() -> None:
    e = parse_event({"event_type": "clicked", "entity_type": "movies", "entity_id": 42, "user_id": "u1"})
    assert e == Event("u1", CLICKED, (42,))


def test_extended_shape_round_trips() -> None:
    e = Event("u1", SEEN, (1, 2, 3), "ev-1", "rec-9", 1764300000.5)
    assert parse_event(orjson.loads(e.encode())) == e
    assert e.to_json()["entity_ids"] == [1, 2, 3]


def test_iso_timestamp() -> None:
    e = parse_event({"event_type": "seen", "entity_id": 1, "user_id": "u", "ts": "2026-11-28T10:00:00+00:00"})
    assert e.ts == 1795860000.0


@pytest.mark.parametrize(
    ("event", "says"),
    [
        ([], "JSON object"),
        ({"event_type": "liked", "entity_id": 1, "user_id": "u"}, "event_type"),
        ({"event_type": ["seen"], "entity_id": 1, "user_id": "u"}, "event_type"),  # unhashable: once a crash
        ({"event_type": "seen", "entity_type": "books", "entity_id": 1, "user_id": "u"}, "entity_type"),
        ({"event_type": "seen", "entity_id": 1}, "user_id"),
        ({"event_type": "seen", "entity_id": 1, "user_id": ""}, "user_id"),
        ({"event_type": "seen", "entity_id": 1, "user_id": "x" * 129}, "user_id"),
        ({"event_type": "seen", "entity_id": 1, "user_id": "a\nb"}, "user_id"),
        ({"event_type": "seen", "user_id": "u"}, "entity_id"),
        ({"event_type": "seen", "entity_id": "42", "user_id": "u"}, "entity_id must be a movie id"),
        ({"event_type": "seen", "entity_id": True, "user_id": "u"}, "entity_id must be a movie id"),
        ({"event_type": "seen", "entity_id": 2.5, "user_id": "u"}, "movie ids must be integers"),
        ({"event_type": "seen", "entity_id": -1, "user_id": "u"}, "movie ids must be integers"),
        ({"event_type": "seen", "entity_ids": [], "user_id": "u"}, "entity_ids"),
        ({"event_type": "seen", "entity_ids": list(range(1, 200)), "user_id": "u"}, "entity_ids"),
        ({"event_type": "seen", "entity_id": 1, "user_id": "u", "event_id": 5}, "event_id"),
        ({"event_type": "seen", "entity_id": 1, "user_id": "u", "ts": "yesterday"}, "ts"),
    ],
)
def test_malformed_events_say_what_is_wrong(event: object, says: str) -> None:
    with pytest.raises(MalformedEvent) as err:
        parse_event(event)
    assert says in err.value.detail


def test_a_batch_is_all_or_nothing_with_every_problem_named() -> None:
    good = {"event_type": "seen", "entity_id": 1, "user_id": "u"}
    events, problems = decode(orjson.dumps([good, {"event_type": "nope"}, good, {**good, "entity_id": 99}]), None, {1})
    assert events == []
    assert [(p.at, p.label, p.detail.split(" ")[0]) for p in problems] == [
        (1, "invalid", "event_type"),
        (3, "unknown_movie", "no"),
    ]
    events, problems = decode(orjson.dumps([good, good]), "m-1", {1})
    assert [e.event_id for e in events] == ["m-1#0", "m-1#1"] and problems == []
    events, problems = decode(b"{not json")
    assert events == [] and problems[0].label == "not_json"
    events, problems = decode(orjson.dumps([good] * (MAX_BATCH + 1)))
    assert events == [] and problems[0].label == "too_large"


def test_a_movie_id_named_twice_is_refused_not_counted_twice() -> None:
    with pytest.raises(MalformedEvent, match="repeat"):
        parse_event({"event_type": "seen", "entity_ids": [1, 1, 1, 1], "user_id": "u"})


@pytest.mark.parametrize("ts", [1e308, -1.0, 0, 253402300799, "9999-12-31T00:00:00+00:00", "2026-11-28T10:00:00"])
def test_a_timestamp_outside_the_window_or_without_an_offset_is_refused(ts: object) -> None:
    with pytest.raises(MalformedEvent, match="ts must"):
        parse_event({"event_type": "seen", "entity_id": 1, "user_id": "u", "ts": ts})


def test_a_timestamp_a_little_ahead_of_the_clock_is_fine() -> None:
    ahead = time.time() + 3600
    assert parse_event({"event_type": "seen", "entity_id": 1, "user_id": "u", "ts": ahead}).ts == ahead
    assert timestamp("2026-11-28T10:00:00Z") == 1795860000.0


def test_user_id_rules() -> None:
    for good in ("user 42 ✓", "café", "🎬 fan", "x" * 128, "🎬" * 128):
        assert user_id(good) == good
    for bad in ("", "x" * 129, "🎬" * 129, "tab\there", " lead", "trail ", "zero\u200bwidth", None, 42):
        with pytest.raises(BadRequest):
            user_id(bad)


def test_a_uxid_header_is_utf8_like_every_other_user_id() -> None:
    # Starlette hands header bytes over decoded as Latin-1.
    assert user_id_header("café".encode().decode("latin-1")) == "café"
    assert user_id_header("🎬 fan".encode().decode("latin-1")) == "🎬 fan"
    with pytest.raises(BadRequest, match="UTF-8"):
        user_id_header(b"caf\xe9".decode("latin-1"))  # Latin-1 bytes, not UTF-8


@pytest.mark.parametrize("raw", ["1_0", "+2", "0002", " 2", "2 ", "٢", "-1", "0", "2147483648", "1e3", "", "0x10"])
def test_a_movie_id_in_a_path_is_plain_digits_only(raw: str) -> None:
    with pytest.raises(BadRequest, match="plain digits"):
        movie_id(raw)


def test_movie_ids_in_a_path() -> None:
    assert [movie_id(r) for r in ("1", "42", "2147483647")] == [1, 42, 2147483647]


def test_redact_drops_the_users_items_and_keeps_the_others_decoding_alike() -> None:
    items = [
        {"event_type": "seen", "entity_ids": [1, 2], "user_id": "ana"},
        {"event_type": "clicked", "entity_id": 2, "user_id": "caf\u00e9"},
        {"event_type": "clicked", "entity_id": 3, "user_id": "bob", "event_id": "b-1"},
    ]
    escaped = orjson.dumps(items).replace("é".encode(), b"\\u00e9")  # as another producer may write it
    for payload in (orjson.dumps(items), escaped):
        redacted = redact(payload, "msg-7", "café")
        assert redacted is not None and "café".encode() not in redacted and b"u00e9" not in redacted
        before, _ = decode(payload, "msg-7")
        after, errors = decode(redacted, None)  # the copy is read without its Nats-Msg-Id
        assert after == [e for e in before if e.user != "café"] and not errors
        assert [e.event_id for e in after] == ["msg-7#0", "b-1"]
    assert redact(orjson.dumps(items), "msg-7", "nobody") is None
    assert redact(orjson.dumps(items[0]), None, "ana") == b"[]"  # a single event: nothing left
    assert redact(b"not json, from caf\xc3\xa9", None, "café") == b"[]"
    # A batch refused whole stays refused whole: without the user's items it must not start to count.
    refused = orjson.dumps([items[0], {"event_type": "nonsense", "user_id": "café"}])
    assert decode(refused)[0] == [] and redact(refused, "msg-8", "café") == b"[]"
