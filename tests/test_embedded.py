"""The local Ray's environment: private per state dir, and token-authenticated on a fresh machine."""

from __future__ import annotations

import stat
from pathlib import Path

from system.local.servers import ray_environment


def test_the_ray_token_is_made_once_per_state_dir_and_kept_private(tmp_path: Path) -> None:
    first = ray_environment(tmp_path / "a")
    token = Path(first["RAY_AUTH_TOKEN_PATH"])
    assert first["RAY_AUTH_MODE"] == "token" and token.parent == (tmp_path / "a").resolve()
    secret = token.read_text()
    assert len(secret) == 64 and int(secret, 16) >= 0
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert ray_environment(tmp_path / "a") == first and token.read_text() == secret  # reused, not remade
    other = ray_environment(tmp_path / "b")
    assert Path(other["RAY_AUTH_TOKEN_PATH"]).read_text() != secret
    assert other["RAY_TMPDIR"] != first["RAY_TMPDIR"]
    assert list(token.parent.iterdir()) == [token]  # no temporary file left behind
