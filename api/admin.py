"""Admin routes: each takes `Authorization: Bearer <MABREC_ADMIN_TOKEN>`, compared in constant
time; with no token configured they are off (403). They read any user's profile, erase users,
show the internals (process ids, errors) and change the deployment: nothing a user's client may
do. (`mabrec up` makes a token for a local system: system/local/admin_token.py.)"""

from __future__ import annotations

import hmac

import orjson
from starlette.requests import Request
from starlette.responses import Response

from api.backend import Backend
from api.responses import json_response
from system.core.errors import BadRequest, Forbidden, Unauthorized
from system.core.inputs import USER_ID_RULE, bounded, user_id, user_id_header
from system.core.limits import MAX_SHARDS
from system.core.profile import describe


def require_admin(request: Request) -> None:
    token: str | None = request.state.admin_token
    if not token:
        raise Forbidden("admin routes are off: set MABREC_ADMIN_TOKEN (or MABREC_ADMIN_TOKEN_FILE) to turn them on")
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise Unauthorized("an admin route needs `Authorization: Bearer <MABREC_ADMIN_TOKEN>`")


def _backend(request: Request) -> Backend:
    require_admin(request)
    backend: Backend = request.state.backend
    return backend


def _user(request: Request) -> str:
    """The user a route is about: the path's {uxid}, else the `uxid` header."""
    if "uxid" in request.path_params:  # percent-decoded as UTF-8 by Starlette
        return user_id(request.path_params["uxid"], "the user id in the path")
    header = request.headers.get("uxid")
    if header is None:
        raise BadRequest(f"the uxid header is required: it identifies the user ({USER_ID_RULE})")
    return user_id_header(header)


async def user(request: Request) -> Response:
    """/api/users/{uxid}: one route for its methods, so a 405 lists them all in `Allow`."""
    return await (erase_user(request) if request.method == "DELETE" else profile(request))


async def profile(request: Request) -> Response:
    """What the system learned about a user: posteriors, top facets, their last slate and why."""
    backend = _backend(request)
    uxid = _user(request)
    return json_response(describe(uxid, await backend.profile(uxid), backend.catalog.catalog))


async def erase_user(request: Request) -> Response:
    """The user's state leaves memory and PostgreSQL now; their events leave the event log next
    (GET /api/admin/erasures shows when). Their id then names a new user."""
    backend = _backend(request)
    erased = await backend.erase(_user(request))
    return json_response({**erased, "log": "scrubbing", "progress": "/api/admin/erasures"}, 202)


async def erasures(request: Request) -> Response:
    return json_response({"erasures": await _backend(request).erasures()})


async def status(request: Request) -> Response:
    return json_response(_backend(request).status())


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
