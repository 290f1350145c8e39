"""The live demo page, /demo: plain HTML, CSS and JavaScript shipped in this package
(static/), served by the API itself. Nothing comes from the internet (no CDN, no web font),
and the page's Content-Security-Policy lets the browser load and call nothing but this origin.

The page asks the public routes for a user's slate and opens movies with a `uxid` header (each
open is a click, applied through NATS), and reads /api/profile with the admin token it takes
from the URL fragment (`/demo#token=...`: browsers never send a fragment to a server) or from
its token field, kept in the tab's sessionStorage."""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, Response

DEMO_STATIC = Path(__file__).resolve().parent / "static"
DEMO_ASSETS = "/demo/static"  # where app.py mounts DEMO_STATIC
POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


async def demo_page(request: Request) -> Response:
    return FileResponse(
        DEMO_STATIC / "index.html",
        media_type="text/html; charset=utf-8",
        headers={"Content-Security-Policy": POLICY, "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"},
    )
