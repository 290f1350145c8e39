"""Feedback events: the JSON contract, validation, and the compact form shards apply.

Accepted JSON (one object per NATS message, or an array of such objects):
    {"event_type": "seen" | "clicked", "entity_type": "movies", "entity_id": 42, "user_id": "u1",
     "event_id": "...", "ts": 1764300000.0, "recommendation_id": "..."}
`entity_ids` (a list) may replace `entity_id`: one impression event for a whole slate.
`event_id`, `ts` and `recommendation_id` are optional. Each field's rule is in
system/core/inputs.py (a user id, a movie id, a timestamp), the one definition every path uses.

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
from typing import Any, NamedTuple

import numpy as np
import orjson

from system.core.errors import BadRequest, MalformedEvent
from system.core.inputs import movie_id_value, timestamp, user_id

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


def parse_event(obj: Any) -> Event:
    """An Event from decoded JSON, or MalformedEvent saying what is wrong."""
    if not isinstance(obj, dict):
        raise MalformedEvent("an event must be a JSON object")
    event_type = obj.get("event_type")
    kind = KINDS.get(event_type) if isinstance(event_type, str) else None
    if kind is None:
        raise MalformedEvent(f"event_type must be 'seen' or 'clicked', got {obj.get('event_type')!r}")
    if obj.get("entity_type", "movies") != "movies":
        raise MalformedEvent(f"entity_type must be 'movies', got {obj.get('entity_type')!r}")
    try:
        user = user_id(obj.get("user_id"))
    except BadRequest as exc:
        raise MalformedEvent(exc.detail) from None
    if "entity_ids" in obj and "entity_id" in obj:
        raise MalformedEvent("give entity_id or entity_ids, not both")
    if "entity_ids" in obj:
        movies = obj["entity_ids"]
        if not isinstance(movies, list) or not 1 <= len(movies) <= MAX_ENTITIES:
            raise MalformedEvent(f"entity_ids must be a list of 1 to {MAX_ENTITIES} movie ids")
    elif "entity_id" in obj:
        movies = [obj["entity_id"]]
    else:
        raise MalformedEvent("entity_id (or entity_ids) is required")
    movies = [movie_id_value(m) for m in movies]
    if None in movies:
        raise MalformedEvent("movie ids must be positive 32-bit integers")
    if len(set(movies)) != len(movies):  # [1, 1, 1] is not three impressions
        raise MalformedEvent("entity_ids must not repeat a movie id")
    return Event(
        user=user,
        kind=kind,
        movies=tuple(movies),
        event_id=_optional_str(obj, "event_id"),
        recommendation_id=_optional_str(obj, "recommendation_id"),
        ts=_optional_ts(obj),
    )


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
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        return [], [Problem(-1, payload, "not_json", f"not JSON: {exc}")]
    items = data if isinstance(data, list) else [data]
    return parse_batch(items, known, (lambda i, _: f"{msg_id}#{i}") if msg_id else None)


def _optional_str(obj: dict[str, Any], key: str) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_ID:
        raise MalformedEvent(f"{key} must be a string of 1 to {MAX_ID} characters")
    return value


def _optional_ts(obj: dict[str, Any]) -> float | None:
    value = obj.get("ts")
    if value is None:
        return None
    try:
        return timestamp(value)
    except ValueError as exc:
        raise MalformedEvent(str(exc)) from None


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
