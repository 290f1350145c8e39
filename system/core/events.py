"""Feedback events: the JSON contract, validation, and the compact form shards apply.

Accepted JSON (one object per NATS message, or an array of such objects):
    {"event_type": "seen" | "clicked", "entity_type": "movies", "entity_id": 42, "user_id": "u1",
     "event_id": "...", "ts": 1764300000.0, "recommendation_id": "..."}
`entity_ids` (a list) may replace `entity_id`: one impression event for a whole slate.
`event_id`, `ts` and `recommendation_id` are optional. `FeedbackEvent` below is the contract:
the type every path decodes with and the JSON Schema /openapi.json publishes; the rules of a
user id, a movie id and a timestamp are system/core/inputs.py's, the one definition of each.

A message (or an HTTP request) is all or nothing: if any of its events is malformed, names a
movie id twice, or names a movie the catalog does not have, none of its events counts.

Retries count once. An event whose `event_id` the user's events already carried within the
de-duplication window (24 h by default, MABREC_DEDUP_WINDOW_HOURS) changes nothing. The
window's clock is the event log's: the time JetStream stored the message, so a replay or a
recount decides exactly as the first application did. Per user the newest 100,000 ids are
kept (system/core/limits.py); an event without an id is never a repeat.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Container
from dataclasses import dataclass, replace
from typing import Annotated, Any, Literal, NamedTuple

import msgspec
import numpy as np
import orjson
from msgspec import UNSET, Meta, Struct, UnsetType

from system.core.errors import BadRequest, MalformedEvent
from system.core.inputs import (
    MAX_MOVIE_ID,
    MAX_USER_ID,
    TS_MAX,
    TS_MIN,
    TS_RULE,
    TS_YEARS_PATTERN,
    USER_ID_PATTERN,
    USER_ID_RULE,
    movie_id_value,
    timestamp,
    user_id,
)

SEEN, CLICKED = 0, 1
KINDS = {"seen": SEEN, "clicked": CLICKED}
KIND_NAMES = {v: k for k, v in KINDS.items()}
MAX_ENTITIES = 100
MAX_ID = 128
MAX_BATCH = 1000
# Publish-to-applied lag (an event's `ts` to the moment a shard applies it) is counted in these
# log-spaced buckets: upper edges from 1 ms to 100 s.
LAG_EDGES = np.logspace(-3, 2, 5 * 10 + 1)


@dataclass(frozen=True, slots=True)
class Event:
    user: str
    kind: int
    movies: tuple[int, ...]
    event_id: str | None = None
    recommendation_id: str | None = None
    ts: float | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "event_type": KIND_NAMES[self.kind],
            "entity_type": "movies",
            "user_id": self.user,
        }
        if len(self.movies) == 1:
            out["entity_id"] = self.movies[0]
        else:
            out["entity_ids"] = list(self.movies)
        for key in ("event_id", "recommendation_id", "ts"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    def encode(self) -> bytes:
        return orjson.dumps(self.to_json())

    @property
    def id_hash(self) -> int:
        """A 63-bit digest of event_id (0 when there is none), for compact de-duplication."""
        return id_hash(self.event_id) if self.event_id else 0


def id_hash(event_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(event_id.encode(), digest_size=8).digest(), "little") >> 1


# The event contract as a type: msgspec decodes and checks JSON against it in one pass (4x
# faster than decoding first and checking in Python), and api/openapi.py publishes the JSON
# Schema it makes of the same type. What a type cannot say (one of entity_id and entity_ids;
# distinct ids; a user id's whole-string rule; a ts string's date) `_event` checks after.
# Each field's description is its rule in words: the JSON Schema's, and the error's
# ("entity_id must be <description> (what msgspec found)").
MovieId = Annotated[
    int | float,  # as JSON Schema has it, 2.0 is the integer 2; "2", true and 2.5 are not
    Meta(
        description=f"a movie id (an integer from 1 to {MAX_MOVIE_ID}) the catalog has, else the whole batch is refused",
        extra_json_schema={"type": "integer", "minimum": 1, "maximum": MAX_MOVIE_ID},
    ),
]
Text = Annotated[str, Meta(min_length=1, max_length=MAX_ID, description=f"a string of 1 to {MAX_ID} characters")]


class FeedbackEvent(Struct, kw_only=True):
    """A feedback event, in the original service's shape. `entity_ids` may replace `entity_id`
    (one impression for a whole slate). A repeated `event_id` counts once."""

    event_type: Annotated[Literal["seen", "clicked"], Meta(description="'seen' or 'clicked'")]
    user_id: Annotated[
        str,
        Meta(
            min_length=1,
            max_length=MAX_USER_ID,
            description=USER_ID_RULE,
            extra_json_schema={"pattern": USER_ID_PATTERN},
        ),
    ]
    entity_type: Annotated[Literal["movies"], Meta(description="'movies'")] = "movies"
    entity_id: MovieId | UnsetType = UNSET
    entity_ids: (
        Annotated[
            list[MovieId],
            Meta(
                min_length=1,
                max_length=MAX_ENTITIES,
                description=f"a list of 1 to {MAX_ENTITIES} distinct movie ids",
                extra_json_schema={"uniqueItems": True},
            ),
        ]
        | UnsetType
    ) = UNSET
    event_id: Text | None = None
    recommendation_id: Text | None = None
    ts: Annotated[
        Annotated[float, Meta(ge=TS_MIN, lt=TS_MAX)]
        | Annotated[str, Meta(extra_json_schema={"format": "date-time", "pattern": TS_YEARS_PATTERN})]
        | None,
        Meta(description=f"{TS_RULE} (null: as if absent)"),
    ] = None


# One event, or a batch of them: a NATS message's payload and POST /api/events's body alike.
Payload = FeedbackEvent | Annotated[list[FeedbackEvent], Meta(min_length=1, max_length=MAX_BATCH)]
_PAYLOAD = msgspec.json.Decoder(Payload)


def json_schemas(ref_template: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The JSON Schema of a payload, and the components it refers to, with what the type cannot
    say but `_event` checks: exactly one of entity_id and entity_ids."""
    (payload,), components = msgspec.json.schema_components([Payload], ref_template=ref_template)
    components["FeedbackEvent"]["oneOf"] = [{"required": ["entity_id"]}, {"required": ["entity_ids"]}]
    return payload, components


def parse_event(obj: Any) -> Event:
    """An Event from decoded JSON, or MalformedEvent saying what is wrong."""
    try:
        return _event(msgspec.convert(obj, FeedbackEvent))
    except msgspec.ValidationError as exc:
        raise MalformedEvent(_said(exc)) from None


def _event(e: FeedbackEvent) -> Event:
    """The compact Event of a well-typed one, or MalformedEvent for what the type cannot say."""
    if e.entity_ids is not UNSET:
        if e.entity_id is not UNSET:
            raise MalformedEvent("give entity_id or entity_ids, not both")
        given: list[int | float] = e.entity_ids
    elif e.entity_id is not UNSET:
        given = [e.entity_id]
    else:
        raise MalformedEvent("entity_id (or entity_ids) is required")
    movies = [movie_id_value(m) for m in given]
    if None in movies:
        raise MalformedEvent(f"movie ids must be integers from 1 to {MAX_MOVIE_ID}")
    if len(movies) > 1 and len(set(movies)) != len(movies):  # [1, 1, 1] is not three impressions
        raise MalformedEvent("entity_ids must not repeat a movie id")
    try:
        user = user_id(e.user_id)
        ts = None if e.ts is None else timestamp(e.ts)
    except BadRequest as exc:
        raise MalformedEvent(exc.detail) from None
    except ValueError as exc:
        raise MalformedEvent(str(exc)) from None
    return Event(user, KINDS[e.event_type], tuple(movies), e.event_id, e.recommendation_id, ts)  # type: ignore[arg-type]


def _said(exc: msgspec.ValidationError) -> str:
    """The rule of the field msgspec names, and what it found: `ts must be <rule> (Expected ...)`."""
    text = str(exc)
    where = text.rfind(" - at `$")
    if where < 0:
        return "an event must be a JSON object" if "Expected `object`" in text else text
    field = text[where + len(" - at `$") : -1].lstrip(".").split("[", 1)[0]
    found = text[:where].replace("`int | float`", "an integer")
    rule = _RULES.get(field)
    return f"{field} must be {rule} ({found})" if rule else f"{field}: {found}"


def _description(schema: dict[str, Any]) -> str | None:
    found: str | None = schema.get("description")
    for part in schema.get("anyOf", []):
        found = found or _description(part)
    return found


_RULES = {
    name: _description(prop)
    for name, prop in msgspec.json.schema(FeedbackEvent)["$defs"]["FeedbackEvent"]["properties"].items()
}


class Problem(NamedTuple):
    """Why a batch was refused: the item at `at` (-1: the whole batch), a short label
    (the dead-letter counter's), and the reason in words."""

    at: int
    item: Any
    label: str
    detail: str


def parse_batch(
    items: list[Any], known: Container[int] | None = None, event_id: Callable[[int, Any], str | None] | None = None
) -> tuple[list[Event], list[Problem]]:
    """The events of a batch, all or nothing: with any problem (a malformed item, or with
    `known`, a movie id the catalog lacks), no event and every problem. `event_id(index, item)`
    names an event that came without an id."""
    if len(items) > MAX_BATCH:
        return [], [Problem(-1, items, "too_large", f"a batch carries at most {MAX_BATCH} events, got {len(items)}")]
    events, problems = [], []
    for i, item in enumerate(items):
        try:
            event = parse_event(item)
        except MalformedEvent as exc:
            problems.append(Problem(i, item, "invalid", exc.detail))
            continue
        if known is not None and (unknown := [m for m in event.movies if m not in known]):
            problems.append(Problem(i, item, "unknown_movie", f"no movie {unknown[0]} in the catalog"))
            continue
        if event.event_id is None and event_id is not None:
            event = replace(event, event_id=event_id(i, item))
        events.append(event)
    return ([], problems) if problems else (events, [])


def decode(
    payload: bytes, msg_id: str | None = None, known: Container[int] | None = None
) -> tuple[list[Event], list[Problem]]:
    """The events of one message, all or nothing (`parse_batch`). With the message's
    `Nats-Msg-Id`, an event without an `event_id` gets one made of it and its place in the
    message, so a publisher's re-send of the same message counts once too."""
    event_id = (lambda i, _: f"{msg_id}#{i}") if msg_id else None
    events = _typed(payload, known)
    if events is not None:
        if event_id is not None:
            events = [e if e.event_id else replace(e, event_id=event_id(i, None)) for i, e in enumerate(events)]
        return events, []
    try:  # below, item by item, every problem named
        data = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        return [], [Problem(-1, payload, "not_json", f"not JSON: {exc}")]
    items = data if isinstance(data, list) else [data]
    return parse_batch(items, known, event_id)


def _typed(payload: bytes, known: Container[int] | None) -> list[Event] | None:
    """The events of a payload that keeps every rule, in one typed pass (the common case); None
    when anything is wrong, for `decode` to name every problem."""
    try:
        typed = _PAYLOAD.decode(payload)
        events = [_event(e) for e in (typed if isinstance(typed, list) else [typed])]
    except (msgspec.DecodeError, MalformedEvent):  # a ValidationError is a DecodeError
        return None
    if known is not None and any(m not in known for e in events for m in e.movies):
        return None
    return events


def redact(payload: bytes, msg_id: str | None, uxid: str) -> bytes | None:
    """The message without the items of user `uxid` (None: it has none), for erasing the user
    from the event log. The other events decode as before: each keeps the id `decode` gave it.
    A message that is not a JSON batch but names the user becomes empty."""
    if uxid.encode() not in payload and b"\\" not in payload:  # not there, and not escaped either
        return None
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return b"[]" if uxid.encode() in payload else None
    items = data if isinstance(data, list) else [data]
    if parse_batch(items)[1]:  # refused whole by `decode`: nothing in it counted, nor may its remains
        return b"[]" if any(isinstance(i, dict) and i.get("user_id") == uxid for i in items) else None
    kept = []
    for i, item in enumerate(items):
        if isinstance(item, dict) and item.get("user_id") == uxid:
            continue
        if isinstance(item, dict) and item.get("event_id") is None and msg_id:
            item = {**item, "event_id": f"{msg_id}#{i}"}
        kept.append(item)
    if len(kept) == len(items) and uxid.encode() not in payload:
        return None
    return orjson.dumps(kept)
