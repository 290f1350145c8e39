"""One definition of each input the system takes, used by every path that takes it: the API's
headers, paths and query parameters, the event contract (HTTP and NATS alike), and the settings
read from the environment. api/openapi.py publishes the same rules."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

from system.core.errors import BadRequest

# A user id: 1 to 128 characters (code points, not bytes) of UTF-8 text, printable: none of the
# control or separator characters (the plain space aside; UTF-8 and JSON carry no lone
# surrogate), nor the invisible formatting characters of the Basic Multilingual Plane (soft
# hyphen, zero-width space, direction marks, BOM...; the zero-width joiners stay: emoji sequences
# and some scripts need them), and no space at either end: an HTTP header cannot carry one there,
# and the same person must be the same id on every path. A regular expression both in Python and in JSON Schema (api/openapi.py).
MAX_USER_ID = 128
NOT_PRINTABLE = (
    "\\u0000-\\u001f\\u007f-\\u00a0\\u00ad\\u0600-\\u0605\\u061c\\u06dd\\u070f\\u0890-\\u0891\\u08e2\\u1680\\u180e"
    "\\u2000-\\u200b\\u200e-\\u200f\\u2028-\\u202f\\u205f-\\u2064\\u2066-\\u206f\\u3000\\ufeff\\ufff9-\\ufffb"
)
USER_ID_PATTERN = f"^[^ {NOT_PRINTABLE}](?:[^{NOT_PRINTABLE}]*[^ {NOT_PRINTABLE}])?$"
USER_ID_RULE = f"1 to {MAX_USER_ID} printable UTF-8 characters, no space at either end"
_USER_ID = re.compile(USER_ID_PATTERN)

# A movie id: a positive 32-bit integer, written in ASCII digits without sign, leading zero,
# space or underscore (int() would take "+2", "0002", " 2", "1_0" and non-ASCII digits).
MAX_MOVIE_ID = 2**31 - 1
MOVIE_ID_PATTERN = r"^[1-9][0-9]{0,9}$"
_MOVIE_ID = re.compile(MOVIE_ID_PATTERN, re.ASCII)

# An event's timestamp: seconds since the epoch in [2000, 2100), or an ISO 8601 date-time of
# those years with a UTC offset. A fixed window: the same answer on every replay, and one JSON
# Schema can state.
TS_MIN = 946_684_800.0  # 2000-01-01T00:00:00Z
TS_MAX = 4_102_444_800.0  # 2100-01-01T00:00:00Z, excluded
TS_YEARS_PATTERN = "^20[0-9]{2}-"
TS_RULE = "seconds since the epoch from 2000 to 2100, or an ISO 8601 date-time of those years with a UTC offset"
_TS_YEARS = re.compile(TS_YEARS_PATTERN, re.ASCII)

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


def user_id(value: Any, field: str = "user_id") -> str:
    """A user id (USER_ID_RULE), or BadRequest naming `field`."""
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_USER_ID or not _USER_ID.fullmatch(value):
        raise BadRequest(f"{field} must be {USER_ID_RULE}")
    return value


def user_id_header(value: str, field: str = "uxid") -> str:
    """A user id from an HTTP header: Starlette hands header bytes over decoded as Latin-1; they
    are UTF-8 (as a user id is everywhere else), so `café` is the same user on every path."""
    try:
        text = value.encode("latin-1").decode("utf-8")
    except UnicodeError:
        raise BadRequest(f"the {field} header must be UTF-8: {USER_ID_RULE}") from None
    return user_id(text, f"the {field} header")


def movie_id(raw: str) -> int:
    """A movie id written in a URL path (MOVIE_ID_PATTERN), or BadRequest."""
    if not _MOVIE_ID.fullmatch(raw) or int(raw) > MAX_MOVIE_ID:
        raise BadRequest(f"a movie id is a positive integer in plain digits (1 to {MAX_MOVIE_ID}), got {raw!r}")
    return int(raw)


def movie_id_value(value: Any) -> int | None:
    """A movie id in JSON: an integer from 1 to MAX_MOVIE_ID (2.0 is the integer 2, as JSON Schema
    has it; true, "2" and 2.5 are not), else None."""
    if type(value) is float and value.is_integer():
        value = int(value)
    return value if type(value) is int and 0 < value <= MAX_MOVIE_ID else None


def timestamp(value: Any) -> float:
    """An event's `ts` (TS_RULE) as epoch seconds, or ValueError saying what is wrong."""
    if isinstance(value, str):
        parsed = None
        if _TS_YEARS.match(value):
            try:
                parsed = datetime.fromisoformat(value)
            except ValueError:
                pass
        if parsed is None:
            raise ValueError(f"ts must be {TS_RULE}, got {value[:40]!r}")
        if parsed.tzinfo is None:  # local time of which machine? refuse rather than guess
            raise ValueError(f"ts must carry a UTC offset (e.g. 2026-12-01T10:00:00Z), got {value[:40]!r}")
        return parsed.timestamp()
    if type(value) in (int, float) and TS_MIN <= value < TS_MAX:
        return float(value)
    raise ValueError(f"ts must be {TS_RULE}, got {str(value)[:40]!r}")
