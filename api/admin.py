"""Admin routes: each takes `Authorization: Bearer <MABREC_ADMIN_TOKEN>`, compared in constant
time; with no token configured they are off (403), so nothing unauthenticated changes the
deployment."""

from __future__ import annotations

import hmac

import orjson
from starlette.requests import Request
from starlette.responses import Response

from api.backend import Backend
from api.responses import json_response
from system.core.errors import BadRequest, Forbidden, Unauthorized
from system.core.inputs import bounded

MAX_SHARDS = 256


def require_admin(request: Request) -> None:
    token: str | None = request.state.admin_token
    if not token:
        raise Forbidden("admin routes are off: set MABREC_ADMIN_TOKEN (or MABREC_ADMIN_TOKEN_FILE) to turn them on")
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise Unauthorized("an admin route needs `Authorization: Bearer <MABREC_ADMIN_TOKEN>`")


async def scale(request: Request) -> Response:
    """POST {"shards": N}: the running system moves to N shards, live (as `mabrec scale`)."""
    require_admin(request)
    try:
        body = orjson.loads(await request.body())
        shards = bounded(str(body["shards"]), int, 1, MAX_SHARDS)
    except (orjson.JSONDecodeError, TypeError, KeyError, ValueError):
        raise BadRequest(f'send {{"shards": N}}, N an integer from 1 to {MAX_SHARDS}') from None
    backend: Backend = request.state.backend
    await backend.set_desired_shards(shards)
    return json_response({"desired_shards": shards, "progress": "/api/status (change, slot_owners)"}, 202)
