"""One definition of each input the system takes, used by every path that takes it: the API's
headers and query parameters, the event contract, and the settings read from the environment."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeVar

from system.core.errors import BadRequest

MAX_UXID = 128  # characters

# Plain ASCII decimals only: int() and float() also take "1_0", " 5", "+2" and non-ASCII digits.
_INTEGER = re.compile(r"-?[0-9]+", re.ASCII)
_NUMBER = re.compile(r"-?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+)?", re.ASCII)

N = TypeVar("N", int, float)


def bounded(raw: str, cast: Callable[[str], N], lo: N, hi: N) -> N:
    """`raw` as a number (`cast` is int or float) in [lo, hi]; ValueError saying what was expected
    otherwise. Callers turn it into their own error, naming the parameter or variable."""
    pattern = _INTEGER if cast is int else _NUMBER
    kind = "an integer" if cast is int else "a number"
    if not pattern.fullmatch(raw):
        raise ValueError(f"must be {kind} between {lo} and {hi}, got {raw!r}")
    value = cast(raw)
    if not lo <= value <= hi:
        raise ValueError(f"must be {kind} between {lo} and {hi}, got {raw!r}")
    return value


def check_uxid(value: Any, field: str = "uxid") -> str:
    """A user id: 1 to MAX_UXID printable characters (an opaque string to the service)."""
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_UXID or not value.isprintable():
        raise BadRequest(f"{field} must be 1 to {MAX_UXID} printable characters")
    return value
