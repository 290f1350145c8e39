from __future__ import annotations

import orjson
import pytest

from system.core.errors import BadRequest, MalformedEvent
from system.core.events import CLICKED, SEEN, Event, decode, parse_event, redact
from system.core.inputs import check_uxid


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
        ({"event_type": "seen", "entity_id": "42", "user_id": "u"}, "movie ids"),
        ({"event_type": "seen", "entity_id": True, "user_id": "u"}, "movie ids"),
        ({"event_type": "seen", "entity_id": -1, "user_id": "u"}, "movie ids"),
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


def test_decode_splits_good_from_bad_in_a_batch() -> None:
    good = {"event_type": "seen", "entity_id": 1, "user_id": "u"}
    events, errors = decode(orjson.dumps([good, {"event_type": "nope"}, good]))
    assert len(events) == 2 and [(label, reason.split(" ")[0]) for _, label, reason in errors] == [
        ("invalid", "event_type")
    ]
    events, errors = decode(b"{not json")
    assert events == [] and errors[0][1] == "not_json"


def test_uxid_rules() -> None:
    assert check_uxid("user 42 ✓") == "user 42 ✓"
    for bad in ("", "x" * 129, "tab\there", None, 42):
        with pytest.raises(BadRequest):
            check_uxid(bad)


def test_redact_drops_the_users_items_and_keeps_the_others_decoding_alike() -> None:
    items = [
        {"event_type": "seen", "entity_ids": [1, 2], "user_id": "ana"},
        {"event_type": "clicked", "entity_id": 2, "user_id": "caf\u00e9"},
        {"event_type": "clicked", "entity_id": 3, "user_id": "bob", "event_id": "b-1"},
        {"event_type": "nonsense", "user_id": "caf\u00e9"},  # malformed, still names them
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
