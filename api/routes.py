"""HTTP handlers. Each validates its input (4xx JSON on anything bad), asks the backend, and
answers with pre-rendered movie JSON. No handler blocks: the backend's calls are all async."""

from __future__ import annotations

import hashlib
import itertools
import secrets
import time
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from api.backend import Backend
from api.openapi import docs_html, openapi
from api.params import LIMIT, PAGE, PER_PAGE
from api.responses import json_response, raw_json
from system.core.errors import BadRequest, NotFound, PayloadTooLarge, Unavailable
from system.core.events import CLICKED, KIND_NAMES, MAX_BATCH, SEEN, Event, parse_batch
from system.core.inputs import USER_ID_RULE, movie_id, user_id_header

MAX_BODY = 1 << 20


def _backend(request: Request) -> Backend:
    backend: Backend = request.state.backend
    return backend


def _uxid(request: Request, required: bool) -> str | None:
    value = request.headers.get("uxid")
    if value is None:
        if required:
            raise BadRequest(f"the uxid header is required: it identifies the user ({USER_ID_RULE})")
        return None
    return user_id_header(value)


_ID_PREFIX = secrets.token_hex(6)  # per process: with a counter, unique ids without a syscall each
_ids = itertools.count()


def _new_id() -> str:
    return f"{_ID_PREFIX}{next(_ids):x}"


def _publish(request: Request, events: list[Event]) -> bool:
    accepted = _backend(request).publish(events)
    counter = request.state.metrics.events if accepted else request.state.metrics.events_dropped
    for event in events:
        counter.labels(KIND_NAMES[event.kind]).inc()
    return accepted


async def list_movies(request: Request) -> Response:
    page, per_page = PAGE.read(request), PER_PAGE.read(request)
    rendered = _backend(request).catalog
    total = len(rendered.catalog)
    start = min((page - 1) * per_page, total)
    headers = {"X-Total-Count": str(total), "X-Page": str(page), "X-Per-Page": str(per_page)}
    return raw_json(rendered.many(range(start, min(start + per_page, total))), headers=headers)


async def get_movie(request: Request) -> Response:
    movie = movie_id(request.path_params["id"])
    backend = _backend(request)
    rendered = backend.catalog
    index = int(rendered.catalog.movie_index([movie])[0])
    if index < 0:
        raise NotFound(f"no movie with id {movie}")
    uxid = _uxid(request, required=False)
    if uxid is not None:
        rid = request.headers.get("x-recommendation-id") or request.query_params.get("rid")
        if rid is not None and not 1 <= len(rid) <= 128:
            raise BadRequest("the recommendation id must be 1 to 128 characters")
        _publish(request, [Event(uxid, CLICKED, (movie,), f"clk-{_new_id()}", rid, time.time())])
    return raw_json(rendered.one(index))


async def get_recommendations(request: Request) -> Response:
    uxid = _uxid(request, required=True)
    assert uxid is not None
    limit = LIMIT.read(request)
    backend = _backend(request)
    source = "personal"
    try:
        movie_ids, reasons = await backend.slate(uxid, limit)
    except Unavailable:
        (movie_ids, reasons), source = backend.fallback(limit), "popularity-fallback"
    request.state.metrics.slates.labels(source).inc()
    rid = _new_id()
    if movie_ids:
        _publish(request, [Event(uxid, SEEN, tuple(movie_ids), f"imp-{rid}", rid, time.time())])
    headers = {"X-Recommendation-Id": rid, "X-Mabrec-Source": source, "Cache-Control": "no-store"}
    return raw_json(backend.catalog.by_ids(movie_ids, reasons), headers=headers)


async def post_events(request: Request) -> Response:
    """A batch of events, all or nothing. Each event without an `event_id` gets one: made of
    the request's Idempotency-Key (when it has one), its place in the batch and its content,
    so a retry of the same request counts once; random otherwise (then a retry counts again)."""
    idempotency_key = request.headers.get("idempotency-key")
    if idempotency_key is not None and not (1 <= len(idempotency_key) <= 128 and idempotency_key.isprintable()):
        raise BadRequest("the Idempotency-Key header must be 1 to 128 printable characters")
    body = await _read_body(request)
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the body must be JSON: {exc}") from None
    items = data if isinstance(data, list) else [data]
    if not 1 <= len(items) <= MAX_BATCH:
        raise BadRequest(f"send 1 to {MAX_BATCH} events per request, got {len(items)}")
    events, problems = parse_batch(
        items, _backend(request).catalog.catalog.id_set, lambda i, item: _derived_id(idempotency_key, i, item)
    )
    if problems:
        # All or nothing, as on the stream: a client fixes its batch and re-sends it, without double counting.
        return json_response(
            {
                "error": "malformed_event",
                "detail": f"{len(problems)} of {len(items)} events are refused; none was accepted",
                "errors": [{"index": p.at, "error": p.label, "detail": p.detail} for p in problems[:100]],
            },
            400,
        )
    # Answer "accepted" only once JetStream has the events: then nothing accepted can be lost.
    stream_seq = await _backend(request).publish_durably(events, timeout=5.0)
    for event in events:
        request.state.metrics.events.labels(KIND_NAMES[event.kind]).inc()
    return json_response(
        {"accepted": len(events), "event_ids": [e.event_id for e in events], "stream_seq": stream_seq}, 202
    )


def _derived_id(idempotency_key: str | None, index: int, item: Any) -> str:
    if idempotency_key is None:
        return f"api-{_new_id()}"
    digest = hashlib.blake2b(orjson.dumps([idempotency_key, index, item], option=orjson.OPT_SORT_KEYS), digest_size=16)
    return f"idem-{digest.hexdigest()}"


async def _read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY:
        raise PayloadTooLarge(f"the body may be at most {MAX_BODY} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise PayloadTooLarge(f"the body may be at most {MAX_BODY} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def healthz(request: Request) -> Response:
    return json_response({"status": "ok"})


async def readyz(request: Request) -> Response:
    readiness = _backend(request).readiness()
    return json_response(readiness, 200 if readiness.get("ready") else 503)


async def openapi_json(request: Request) -> Response:
    return json_response(openapi())


async def docs(request: Request) -> Response:
    return HTMLResponse(docs_html())
