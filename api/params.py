"""The query parameters the routes take, each defined once: the handler reads it (a 400 naming
it when it breaks its rule) and /openapi.json publishes the same rule."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from system.core.errors import BadRequest
from system.core.inputs import bounded


@dataclass(frozen=True)
class IntQuery:
    name: str
    description: str
    default: int
    maximum: int
    minimum: int = 1

    def read(self, request: Request) -> int:
        raw = request.query_params.get(self.name)
        if raw is None:
            return self.default
        try:
            return bounded(raw, int, self.minimum, self.maximum)
        except ValueError as exc:
            raise BadRequest(f"{self.name} {exc}") from None

    def openapi(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "in": "query",
            "description": self.description,
            "schema": {"type": "integer", "minimum": self.minimum, "maximum": self.maximum, "default": self.default},
        }


PAGE = IntQuery("page", "Page number, from 1", default=1, maximum=10_000_000)
PER_PAGE = IntQuery("per_page", "Movies per page", default=20, maximum=100)
LIMIT = IntQuery("limit", "Slate size", default=10, maximum=100)
