"""The OpenAPI 3.1 document, written out (it is the contract), and a self-contained docs page
rendered from it (no CDN: it works on an air-gapped laptop)."""

from __future__ import annotations

import html
import importlib.util
import json
from functools import cache
from pathlib import Path
from typing import Any

from api.params import LIMIT, PAGE, PER_PAGE
from system.core.events import json_schemas
from system.core.inputs import MAX_MOVIE_ID, MAX_USER_ID, USER_ID_PATTERN, USER_ID_RULE
from system.core.limits import MAX_SHARDS

# The rules of system/core/inputs.py, as JSON Schema says them. A header carries bytes: the
# schema keeps to printable ASCII there; other characters go as their UTF-8 bytes.
USER_ID = {"type": "string", "minLength": 1, "maxLength": MAX_USER_ID, "pattern": USER_ID_PATTERN}
UXID = {
    "name": "uxid",
    "in": "header",
    "description": f"The user: {USER_ID_RULE} (sent as UTF-8 bytes). Opaque to the service; the same "
    "id as `user_id` in events.",
    "schema": {"type": "string", "minLength": 1, "maxLength": MAX_USER_ID, "pattern": "^[!-~](?:[ -~]*[!-~])?$"},
}
MOVIE_ID = {"type": "integer", "minimum": 1, "maximum": MAX_MOVIE_ID}
ERROR = {"$ref": "#/components/responses/Error"}
REF = "#/components/schemas/{name}"
# Admin routes: `Authorization: Bearer <MABREC_ADMIN_TOKEN>`; 401 without it or with another,
# 403 when the deployment has no token (admin routes off).
ADMIN: list[dict[str, list[str]]] = [{"adminToken": []}]
ADMIN_ERRORS = {"401": ERROR, "403": ERROR}
PROFILE = {
    "description": "`{uxid, clicks, impressions, top_facets: [{kind, id, name, clicks, impressions, lift, "
    "cautious_lift, alpha, beta, mean}], measure, last_slate: {at, movies: [{id, name, reason}]} | null, "
    "movies: [...], facets: [...]}`. top_facets: the facet values the user clicked, ranked by the lift the "
    "policy gives their movies (logits, one posterior standard deviation below the mean); `measure` says so."
}
MOVIES = {
    "description": "Movies",
    "content": {"application/json": {"schema": {"type": "array", "items": {"$ref": "#/components/schemas/Movie"}}}},
}


@cache
def openapi() -> dict[str, Any]:
    facet = {
        "type": "object",
        "properties": {"id": {"type": "integer"}, "name": {"type": "string"}},
        "required": ["id", "name"],
    }
    events_body, event_schemas = json_schemas(REF)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "mabrec",
            "version": "0.1.0",
            "description": "Real-time movie recommendations from Thompson-sampling bandits. Every slate "
            "served and every movie opened with a `uxid` is feedback that changes the user's next slate "
            "within milliseconds.",
        },
        "paths": {
            "/api/movies": {
                "get": {
                    "summary": "List movies by id",
                    "parameters": [
                        PAGE.openapi(),
                        PER_PAGE.openapi(),
                    ],
                    "responses": {
                        "200": {
                            **MOVIES,
                            "headers": {
                                "X-Total-Count": {"schema": {"type": "integer"}, "description": "Movies in the catalog"}
                            },
                        },
                        "400": ERROR,
                    },
                }
            },
            "/api/movies/{id}": {
                "get": {
                    "summary": "One movie with its facets; with a uxid header, records a click",
                    "parameters": [
                        {
                            "name": "id",
                            "in": "path",
                            "required": True,
                            "schema": MOVIE_ID,
                            "description": "In plain digits",
                        },
                        {**UXID, "required": False},
                        {
                            "name": "X-Recommendation-Id",
                            "in": "header",
                            "required": False,
                            "description": "The slate this click came from (also accepted as query `rid`)",
                            "schema": {"type": "string"},
                        },
                    ],
                    "responses": {
                        "200": {
                            "description": "The movie",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Movie"}}},
                        },
                        "400": ERROR,
                        "404": ERROR,
                    },
                }
            },
            "/api/recommendations/movies": {
                "get": {
                    "summary": "A personalized slate, best first; records an impression of it",
                    "parameters": [{**UXID, "required": True}, LIMIT.openapi()],
                    "responses": {
                        "200": {
                            **MOVIES,
                            "headers": {
                                "X-Recommendation-Id": {
                                    "schema": {"type": "string"},
                                    "description": "Quote it on clicks for attribution",
                                },
                                "X-Mabrec-Source": {
                                    "schema": {"type": "string", "enum": ["personal", "popularity-fallback"]},
                                    "description": "popularity-fallback while the user's shard is recovering",
                                },
                            },
                        },
                        "400": ERROR,
                    },
                }
            },
            "/api/events": {
                "post": {
                    "summary": "Submit feedback events (for clients that do not speak NATS); all or nothing",
                    "description": "A retry counts once: events with an `event_id` already seen for the user within "
                    "the de-duplication window (24 h by default) change nothing. Events without one get an id "
                    "derived from the `Idempotency-Key` header (with their place in the batch and their content), "
                    "so a retry of the same request with the same key counts once too; without the key they get "
                    "a random id, and a retry counts again.",
                    "parameters": [
                        {
                            "name": "Idempotency-Key",
                            "in": "header",
                            "required": False,
                            "description": "Any 1 to 128 printable characters, the same on every retry of a request",
                            "schema": {"type": "string", "minLength": 1, "maxLength": 128},
                        }
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": events_body}},
                    },
                    "responses": {
                        "202": {
                            "description": 'Accepted: `{"accepted": n, "event_ids": [...], "stream_seq": s}`; the '
                            "events are stored in the event log, through stream sequence s (what /api/status "
                            "compares with each shard's `covered_seq`)"
                        },
                        "400": ERROR,
                        "413": ERROR,
                        "503": ERROR,
                    },
                }
            },
            "/api/profile": {
                "get": {
                    "summary": "Admin: what the system learned about the user in the uxid header (as /api/users/{uxid})",
                    "security": ADMIN,
                    "parameters": [{**UXID, "required": True}],
                    "responses": {"200": PROFILE, **ADMIN_ERRORS, "400": ERROR, "503": ERROR},
                }
            },
            "/api/users/{uxid}": {
                "parameters": [
                    {
                        "name": "uxid",
                        "in": "path",
                        "required": True,
                        "description": f"The user: {USER_ID_RULE} (percent-encoded UTF-8)",
                        "schema": USER_ID,
                    }
                ],
                "get": {
                    "summary": "Admin: what the system learned about a user: posteriors, top facets, their last slate and why",
                    "security": ADMIN,
                    "responses": {"200": PROFILE, **ADMIN_ERRORS, "400": ERROR, "503": ERROR},
                },
                "delete": {
                    "summary": "Admin: erase a user: their state now, their events from the event log next",
                    "description": "The user's state leaves memory and PostgreSQL at once; the event log's messages "
                    "that name them are deleted once every checkpoint covers them (GET /api/admin/erasures). The id "
                    "then names a new user.",
                    "security": ADMIN,
                    "responses": {
                        "202": {
                            "description": "`{erasure, through_seq, in_memory, checkpointed, log: 'scrubbing', progress}`"
                        },
                        **ADMIN_ERRORS,
                        "400": ERROR,
                        "503": ERROR,
                    },
                },
            },
            "/api/admin/erasures": {
                "get": {
                    "summary": "Admin: the latest erasures, newest first (never whom they were for)",
                    "security": ADMIN,
                    "responses": {
                        "200": {
                            "description": "`{erasures: [{erasure, requested_at, through_seq, log: 'scrubbing' | "
                            "'scrubbed', messages_redacted, dead_letters_deleted, done_at}]}`"
                        },
                        **ADMIN_ERRORS,
                    },
                }
            },
            "/api/admin/scale": {
                "post": {
                    "summary": "Admin: move the running system to N shards, live (as `mabrec scale`)",
                    "security": ADMIN,
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "properties": {"shards": {"type": "integer", "minimum": 1, "maximum": MAX_SHARDS}},
                                    "required": ["shards"],
                                }
                            }
                        },
                    },
                    "responses": {"202": {"description": "`{desired_shards, progress}`"}, **ADMIN_ERRORS, "400": ERROR},
                }
            },
            "/api/status": {
                "get": {
                    "summary": "Admin: shards, event router and publisher status",
                    "security": ADMIN,
                    "responses": {"200": {"description": "Status"}, **ADMIN_ERRORS},
                }
            },
            "/healthz": {"get": {"summary": "Liveness", "responses": {"200": {"description": "The process runs"}}}},
            "/readyz": {
                "get": {
                    "summary": "Readiness: catalog loaded, every shard restored, router running",
                    "responses": {
                        "200": {"description": "Ready"},
                        "503": {"description": "Not ready (detail in body)"},
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "responses": {"200": {"description": "Text exposition format"}},
                }
            },
        },
        "components": {
            "securitySchemes": {
                "adminToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "MABREC_ADMIN_TOKEN (a local `mabrec up` keeps one in .mabrec/admin-token)",
                }
            },
            "schemas": {
                "Movie": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "integer"},
                        "name": {"type": "string"},
                        "description": {"type": "string"},
                        "rating": {"type": ["number", "null"]},
                        "votes": {"type": ["integer", "null"]},
                        "duration": {"type": ["integer", "null"]},
                        "duration_unit": {"type": "string"},
                        "link": {"type": ["string", "null"]},
                        "genres": {"type": "array", "items": facet},
                        "directors": {"type": "array", "items": facet},
                        "actors": {"type": "array", "items": facet},
                        "reason": {
                            "type": "string",
                            "description": "In slates only: why the movie is there, e.g. 'you like Crime', 'popular', 'something new'",
                        },
                    },
                    "additionalProperties": {
                        "type": "array",
                        "items": facet,
                        "description": "Other facet kinds of the catalog",
                    },
                    "required": ["id", "name", "genres", "directors", "actors"],
                },
                **event_schemas,
                "Error": {
                    "type": "object",
                    "properties": {"error": {"type": "string"}, "detail": {"type": "string"}},
                    "required": ["error", "detail"],
                },
            },
            "responses": {
                "Error": {
                    "description": "An error",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
                }
            },
        },
    }


# Swagger UI's assets ship in a Python package (swagger-ui-py: Swagger UI 5, which reads OpenAPI
# 3.1; the swagger-ui-bundle package stopped at 4.15, which reads 3.0 only and showed nothing
# but an error): the docs work offline.
SWAGGER_ASSETS = "/docs/assets"


def swagger_ui_assets() -> Path:
    """The directory of Swagger UI's files in the swagger-ui-py package, found without importing
    it (its import wires up web frameworks mabrec does not use)."""
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("swagger-ui-py is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "static"


@cache
def docs_html() -> str:
    """Swagger UI over /openapi.json: every route, tried from the page ("Try it out": the uxid
    header in its field, the admin token under "Authorize", kept while the tab lives), with a
    plain table of the routes for a browser without JavaScript."""
    spec = openapi()
    options = {
        "url": "/openapi.json",
        "dom_id": "#swagger-ui",
        "deepLinking": True,
        "persistAuthorization": True,
        "displayRequestDuration": True,
    }
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>mabrec API</title>"
        f"<link rel='stylesheet' href='{SWAGGER_ASSETS}/swagger-ui.css'>"
        f"<link rel='icon' href='{SWAGGER_ASSETS}/favicon-32x32.png'></head><body>"
        "<div id='swagger-ui'></div>"
        f"<noscript>{_reference(spec)}</noscript>"
        f"<script src='{SWAGGER_ASSETS}/swagger-ui-bundle.js'></script>"
        f"<script>window.ui = SwaggerUIBundle({json.dumps(options)})</script>"
        "</body></html>"
    )


def _reference(spec: dict[str, Any]) -> str:
    rows = []
    for path, methods in spec["paths"].items():
        shared = methods.get("parameters", [])  # the path's own, for each of its methods
        for method, op in methods.items():
            if method == "parameters":
                continue
            params = ", ".join(
                f"{p['name']} ({p['in']}{', required' if p.get('required') else ''})"
                for p in shared + op.get("parameters", [])
            )
            codes = ", ".join(op.get("responses", {}))
            rows.append(
                f"<tr><td><code>{method.upper()}</code></td><td><code>{html.escape(path)}</code></td>"
                f"<td>{html.escape(op['summary'])}</td><td>{html.escape(params)}</td><td>{codes}</td></tr>"
            )
    return (
        f"<h1>mabrec API {spec['info']['version']}</h1><p>{html.escape(spec['info']['description'])}</p>"
        '<p>Errors are JSON: <code>{"error": code, "detail": text}</code>. '
        "Machine-readable contract: <a href='/openapi.json'>/openapi.json</a>.</p>"
        "<table border='1'><tr><th>Method</th><th>Path</th><th>What</th><th>Parameters</th><th>Responses</th></tr>"
        + "".join(rows)
        + "</table>"
    )
