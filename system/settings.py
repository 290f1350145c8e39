"""Configuration: read once from the environment, cast explicitly, fail loudly with the key's name."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from system.errors import ConfigError

if TYPE_CHECKING:
    from system.policy import PolicyConfig

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# Users hash to a fixed number of slots; slots (never users) move between shards.
SLOTS = 1024


@dataclass(frozen=True)
class Settings:
    database_url: str | None = None
    nats_url: str | None = None
    ray_address: str | None = None
    shards: int = 4
    host: str = "127.0.0.1"
    port: int = 8000
    checkpoint_interval: float = 1.0
    log_level: str = "INFO"
    state_dir: Path = Path(".mabrec")
    namespace: str = "mabrec"
    dashboard: bool = True
    catalog_file: Path | None = None
    event_retention_days: float = 0.0  # 0 keeps the event log forever
    api_workers: int = 1  # API actors sharing the port
    exploration: float = 0.5  # the spread of every Thompson draw (system/policy.py)
    forget_half_life: float = 4.0  # how fast old clicks fade (system/policy.py); 0: never

    @property
    def event_retention(self) -> float:
        """Seconds JetStream keeps an event (0: forever)."""
        return self.event_retention_days * 86400.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from `env` (default: os.environ); CLI flags come in as `overrides`."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {
            "database_url": _url(env, "DATABASE_URL", ("postgresql://", "postgres://")),
            "nats_url": _url(env, "NATS_URL", ("nats://", "tls://")),
            "ray_address": env.get("RAY_ADDRESS") or None,
            "shards": _int(env, "MABREC_SHARDS", 4, 1, 256),
            "host": env.get("MABREC_HOST", "127.0.0.1"),
            "port": _int(env, "MABREC_PORT", 8000, 0, 65535),
            "checkpoint_interval": _float(env, "MABREC_CHECKPOINT_INTERVAL", 1.0, 0.05, 3600.0, "seconds"),
            "log_level": _choice(env, "MABREC_LOG_LEVEL", "INFO", LOG_LEVELS),
            "state_dir": Path(env.get("MABREC_STATE_DIR", ".mabrec")),
            "namespace": _namespace(env),
            "dashboard": _bool(env, "MABREC_DASHBOARD", True),
            "catalog_file": Path(env["MABREC_CATALOG"]) if env.get("MABREC_CATALOG") else None,
            "event_retention_days": _float(env, "MABREC_EVENT_RETENTION_DAYS", 0.0, 0.0, 36500.0, "days"),
            "api_workers": _int(env, "MABREC_API_WORKERS", 1, 1, 64),
            "exploration": _float(env, "MABREC_EXPLORATION", 0.5, 0.05, 20.0, "times the posterior spread"),
            "forget_half_life": _float(env, "MABREC_FORGET_HALF_LIFE", 4.0, 0.0, 1000.0, "missed clicks"),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return replace(cls(), **values).validated()

    def policy(self) -> PolicyConfig:
        """The bandit policy's settings: its tuned defaults, with what operators may change."""
        from system.policy import PolicyConfig  # numpy: only for those that serve or learn

        return PolicyConfig(exploration=self.exploration, forget_half_life=self.forget_half_life)

    def validated(self) -> Settings:
        if not 1 <= self.shards <= 256:
            raise ConfigError(f"MABREC_SHARDS must be between 1 and 256, got {self.shards}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"MABREC_PORT must be a TCP port, got {self.port}")
        return self

    @property
    def stream(self) -> str:
        """JetStream stream holding every accepted feedback event (the event log)."""
        return f"{self.namespace.upper()}_EVENTS"

    @property
    def events_subject(self) -> str:
        """The documented subject other services publish feedback events to."""
        return f"{self.namespace}.events"

    @property
    def deadletter_subject(self) -> str:
        return f"{self.namespace}.deadletter"


def _url(env: Mapping[str, str], key: str, schemes: tuple[str, ...]) -> str | None:
    value = env.get(key, "").strip()
    if not value:
        return None
    if not value.startswith(schemes):
        raise ConfigError(f"{key} must start with {' or '.join(schemes)}, got {value!r}")
    return value


def _int(env: Mapping[str, str], key: str, default: int, lo: int, hi: int) -> int:
    raw = env.get(key, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{key} must be an integer, got {raw!r}") from None
    if not lo <= value <= hi:
        raise ConfigError(f"{key} must be between {lo} and {hi}, got {value}")
    return value


def _float(env: Mapping[str, str], key: str, default: float, lo: float, hi: float, unit: str) -> float:
    raw = env.get(key, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{key} must be a number of {unit}, got {raw!r}") from None
    if not lo <= value <= hi:
        raise ConfigError(f"{key} must be between {lo} and {hi} {unit}, got {value}")
    return value


def _bool(env: Mapping[str, str], key: str, default: bool) -> bool:
    raw = env.get(key, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{key} must be a boolean (1/0, true/false), got {raw!r}")


def _choice(env: Mapping[str, str], key: str, default: str, choices: tuple[str, ...]) -> str:
    raw = env.get(key, "").strip().upper()
    if not raw:
        return default
    if raw not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(choices)}, got {raw!r}")
    return raw


def _namespace(env: Mapping[str, str]) -> str:
    raw = env.get("MABREC_NAMESPACE", "mabrec").strip()
    # It names a JetStream stream, NATS subjects, a Ray namespace and actor names.
    if not re.fullmatch(r"[a-z][a-z0-9_]{0,39}", raw):
        raise ConfigError(f"MABREC_NAMESPACE must match [a-z][a-z0-9_]{{0,39}}, got {raw!r}")
    return raw
