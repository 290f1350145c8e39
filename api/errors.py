"""Every error leaves as JSON `{"error": code, "detail": text}`: ServiceError subclasses carry
their status; Starlette's HTTPException (404 for unknown paths, 405) keeps its own."""

from __future__ import annotations

import logging

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from api.responses import json_response
from system.core.errors import ServiceError

log = logging.getLogger(__name__)

HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


async def service_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ServiceError)
    headers = {"Retry-After": "1"} if exc.status == 503 else None
    if exc.status == 401:
        headers = {"WWW-Authenticate": 'Bearer realm="mabrec admin"'}
    return json_response({"error": exc.code, "detail": exc.detail}, exc.status, headers)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return json_response(
        {"error": HTTP_CODES.get(exc.status_code, "http_error"), "detail": exc.detail}, exc.status_code, exc.headers
    )


async def client_disconnected(request: Request, exc: Exception) -> Response:
    """The client went away mid-request (its body cut short): not the server's error. Nothing
    reaches it; 499 (nginx's "client closed request") is what the access log and metrics see."""
    log.info("client disconnected mid-request", extra={"path": request.url.path})
    return json_response({"error": "client_disconnected", "detail": "the client closed the connection"}, 499)


async def unexpected_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error", extra={"path": request.url.path})
    return json_response({"error": "internal_error", "detail": "an unexpected error occurred"}, 500)


HANDLERS = {
    ServiceError: service_error,
    HTTPException: http_error,
    ClientDisconnect: client_disconnected,
    Exception: unexpected_error,
}
