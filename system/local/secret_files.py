"""Secrets a local `mabrec up` generates for itself (the admin token, the Ray token, the NATS
users' and PostgreSQL's passwords), each in a file of mode 0600 under the state directory,
made once and whole. Files that hold them (the runtime file, the NATS config) are 0600 too."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit


def ensure(path: Path) -> str:
    """The secret in `path`, made (random, URL-safe) if missing: written whole or not at all,
    and when two processes race, both end up with the first one's."""
    if not path.exists():
        tmp = _written_aside(path, secrets.token_urlsafe(32) + "\n")
        with contextlib.suppress(FileExistsError):  # another process made it first: theirs stays
            os.link(tmp, path)
        os.unlink(tmp)
    os.chmod(path, 0o600)  # a copy made readable by others is theirs no longer
    return path.read_text().strip()


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path` (mode 0600 from its first byte), replacing it whole."""
    _written_aside(path, text).replace(path)


def _written_aside(path: Path, text: str) -> Path:
    """`text` in a new file of mode 0600 beside `path` (its directory made if missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    return tmp


def redacted(url: str) -> str:
    """`url` with its password, if it has one, as `***`: for logs and printed status."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))
