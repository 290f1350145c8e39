"""The Starlette application factory: routes, error mapping, metrics. Built explicitly from a
backend; nothing connects at import time."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TypedDict

from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from api import admin, routes
from api.backend import Backend
from api.demo import DEMO_ASSETS, DEMO_STATIC, demo_page
from api.errors import HANDLERS
from api.metrics import ApiMetrics, MetricsMiddleware, StatusCollector
from api.openapi import SWAGGER_ASSETS, swagger_ui_assets


class State(TypedDict):
    backend: Backend
    metrics: ApiMetrics
    admin_token: str | None


def create_app(backend: Backend, metrics: ApiMetrics | None = None, admin_token: str | None = None) -> Starlette:
    """The app. `admin_token`: the bearer token the admin routes take; without one they are off."""
    metrics = metrics or ApiMetrics()
    metrics.registry.register(StatusCollector(backend.status))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[State]:
        yield {"backend": backend, "metrics": metrics, "admin_token": admin_token}

    async def prometheus(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return Starlette(
        routes=[
            Route("/api/movies", routes.list_movies, methods=["GET"]),
            Route("/api/movies/{id}", routes.get_movie, methods=["GET"]),
            Route("/api/recommendations/movies", routes.get_recommendations, methods=["GET"]),
            Route("/api/events", routes.post_events, methods=["POST"]),
            Route("/api/profile", admin.profile, methods=["GET"]),
            Route("/api/users/{uxid}", admin.user, methods=["GET", "DELETE"]),
            Route("/api/status", admin.status, methods=["GET"]),
            Route("/api/admin/erasures", admin.erasures, methods=["GET"]),
            Route("/api/admin/scale", admin.scale, methods=["POST"]),
            Route("/healthz", routes.healthz, methods=["GET"]),
            Route("/readyz", routes.readyz, methods=["GET"]),
            Route("/metrics", prometheus, methods=["GET"]),
            Route("/openapi.json", routes.openapi_json, methods=["GET"]),
            Route("/docs", routes.docs, methods=["GET"]),
            Mount(SWAGGER_ASSETS, StaticFiles(directory=swagger_ui_assets()), name="swagger-ui"),
            Route("/demo", demo_page, methods=["GET"]),
            Mount(DEMO_ASSETS, StaticFiles(directory=DEMO_STATIC), name="demo"),
        ],
        middleware=[Middleware(MetricsMiddleware, metrics=metrics)],
        exception_handlers=HANDLERS,
        lifespan=lifespan,
    )
