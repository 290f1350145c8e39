"""The admin token of a system started from this machine.

`mabrec up` without MABREC_ADMIN_TOKEN (or _FILE) makes one, once, in `<state>/admin-token`
(mode 0600), so the admin routes work on a laptop without setup while nothing on the network
reaches them without it; `mabrec status`, the benchmarks and the tests read it there. A
configured token is used as given and never written to disk.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from system.core.settings import Settings
from system.local import secret_files

FILE = "admin-token"

# Systems this process started (benchmarks, tests): their API URL -> token.
_started: dict[str, str] = {}


def ensure(settings: Settings) -> Settings:
    """`settings` with an admin token: the configured one, else the state dir's (made if missing)."""
    if settings.admin_token:
        return settings
    return replace(settings, admin_token=secret_files.ensure(settings.state_dir / FILE))


def remember(api_url: str, token: str) -> None:
    _started[api_url.rstrip("/")] = token


def headers(api_url: str, settings: Settings | None = None) -> dict[str, str]:
    """The Authorization header for the system at `api_url`: one this process started, else the
    configured token, else the one `mabrec up` made in the state dir. {} when there is none."""
    token = _started.get(api_url.rstrip("/"))
    if token is None:
        settings = settings or Settings.from_env(os.environ)
        token = settings.admin_token or _read(settings.state_dir / FILE)
    return {"Authorization": f"Bearer {token}"} if token else {}


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None
