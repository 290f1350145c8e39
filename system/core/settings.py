"""Configuration: read once from the environment, cast explicitly, fail loudly with the key's name."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from system.core.errors import ConfigError
from system.core.inputs import N, bounded
from system.core.limits import DEDUP_WINDOW_HOURS, MAX_SHARDS, RESIDENT_USERS
from system.core.policy_config import PolicyConfig

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# The command-line flags of `mabrec up`, and the variable each one stands for.
FLAGS = {"shards": "MABREC_SHARDS", "host": "MABREC_HOST", "port": "MABREC_PORT", "dashboard": "MABREC_DASHBOARD"}


@dataclass(frozen=True)
class Settings:
    database_url: str | None = field(default=None, repr=False)  # may hold a password
    nats_url: str | None = field(default=None, repr=False)  # may hold a password
    # The NATS URLs the API, shard and router actors log in with (system/core/access.py); each
    # unset one is `nats_url`. The embedded server fills them in with users of their own.
    nats_api_url: str | None = field(default=None, repr=False)
    nats_shard_url: str | None = field(default=None, repr=False)
    nats_router_url: str | None = field(default=None, repr=False)
    ray_address: str | None = None
    shards: int = 0  # unset: as the last start or `mabrec scale` left it, else one per CPU (placement.py)
    shards_given: bool = False  # MABREC_SHARDS (or --shards) was set: it wins over what `mabrec scale` left
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
    min_nodes: int = 1  # Ray nodes to wait for before placing the actors (they spread over those there)
    resident_users: int = RESIDENT_USERS  # per shard: past it, idle users leave memory (once checkpointed)
    dedup_window_hours: float = DEDUP_WINDOW_HOURS  # a retried event id counts once within this window
    admin_token: str | None = field(default=None, repr=False)  # the admin routes' bearer token; None: off
    # How often NATS JetStream forces the event log to disk (its `sync_interval`, in the server
    # configurations mabrec writes): "always" (an acknowledged event is on disk) or a duration.
    nats_sync: str = "always"
    exploration: float = PolicyConfig.exploration  # the spread of every Thompson draw
    forget_half_life: float = PolicyConfig.forget_half_life  # how fast old clicks fade; 0: never

    @property
    def dedup_window(self) -> int:
        """Seconds within which a repeated event id counts once."""
        return round(self.dedup_window_hours * 3600)

    @property
    def event_retention(self) -> float:
        """Seconds JetStream keeps an event (0: forever)."""
        return self.event_retention_days * 86400.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **flags: Any) -> Settings:
        """Settings from `env` (default: os.environ). Command-line flags (`shards=3`, ...) win over
        the environment and are read as their variable would be, so one rule checks both."""
        env = {**(os.environ if env is None else env)}
        env.update({FLAGS[name]: str(value) for name, value in flags.items() if value is not None})
        d = cls()
        return cls(
            database_url=_url(env, "DATABASE_URL", ("postgresql://", "postgres://")),
            nats_url=_url(env, "NATS_URL", ("nats://", "tls://")),
            nats_api_url=_url(env, "NATS_API_URL", ("nats://", "tls://")),
            nats_shard_url=_url(env, "NATS_SHARD_URL", ("nats://", "tls://")),
            nats_router_url=_url(env, "NATS_ROUTER_URL", ("nats://", "tls://")),
            ray_address=env.get("RAY_ADDRESS") or None,
            shards=_number(env, "MABREC_SHARDS", int, d.shards, 1, MAX_SHARDS),
            shards_given=bool(env.get("MABREC_SHARDS", "").strip()),
            host=env.get("MABREC_HOST", d.host),
            port=_number(env, "MABREC_PORT", int, d.port, 0, 65535),
            checkpoint_interval=_number(env, "MABREC_CHECKPOINT_INTERVAL", float, d.checkpoint_interval, 0.05, 3600.0),
            log_level=_choice(env, "MABREC_LOG_LEVEL", d.log_level, LOG_LEVELS),
            state_dir=Path(env.get("MABREC_STATE_DIR", str(d.state_dir))),
            namespace=_namespace(env, d.namespace),
            dashboard=_bool(env, "MABREC_DASHBOARD", d.dashboard),
            catalog_file=Path(env["MABREC_CATALOG"]) if env.get("MABREC_CATALOG") else None,
            event_retention_days=_number(
                env, "MABREC_EVENT_RETENTION_DAYS", float, d.event_retention_days, 0.0, 36500.0
            ),
            api_workers=_number(env, "MABREC_API_WORKERS", int, d.api_workers, 1, 64),
            min_nodes=_number(env, "MABREC_MIN_NODES", int, d.min_nodes, 1, 1000),
            resident_users=_number(env, "MABREC_RESIDENT_USERS", int, d.resident_users, 100, 100_000_000),
            dedup_window_hours=_number(env, "MABREC_DEDUP_WINDOW_HOURS", float, d.dedup_window_hours, 0.01, 720.0),
            exploration=_number(env, "MABREC_EXPLORATION", float, d.exploration, 0.05, 20.0),
            forget_half_life=_number(env, "MABREC_FORGET_HALF_LIFE", float, d.forget_half_life, 0.0, 1000.0),
            admin_token=_secret(env, "MABREC_ADMIN_TOKEN"),
            nats_sync=_sync_interval(env, "MABREC_NATS_SYNC", d.nats_sync),
        )

    def nats_url_for(self, user: str) -> str:
        """The URL the processes of a role (system/core/access.py: "api", "shard", "router")
        connect to NATS with; `nats_url` (the mabrec user's) for the others."""
        own = {"api": self.nats_api_url, "shard": self.nats_shard_url, "router": self.nats_router_url}.get(user)
        return own or self.nats_url or ""

    def policy(self) -> PolicyConfig:
        """The bandit policy's settings: its tuned defaults, with what operators may change."""
        return PolicyConfig(exploration=self.exploration, forget_half_life=self.forget_half_life)

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

    @property
    def deadletter_stream(self) -> str:
        """JetStream stream of the dead-lettered (malformed) events, kept 7 days."""
        return f"{self.stream}_DLQ"


def _url(env: Mapping[str, str], key: str, schemes: tuple[str, ...]) -> str | None:
    value = env.get(key, "").strip()
    if not value:
        return None
    if not value.startswith(schemes):
        raise ConfigError(f"{key} must start with {' or '.join(schemes)}, got {value!r}")
    return value


def _number(env: Mapping[str, str], key: str, cast: Callable[[str], N], default: N, lo: N, hi: N) -> N:
    raw = env.get(key, "").strip()
    if not raw:
        return default
    try:
        return bounded(raw, cast, lo, hi)
    except ValueError as exc:
        raise ConfigError(f"{key} {exc}") from None


def _secret(env: Mapping[str, str], key: str) -> str | None:
    """A secret from `key`, or from the file `key`_FILE names (its first line)."""
    value = env.get(key, "").strip()
    path = env.get(f"{key}_FILE", "").strip()
    if path:
        try:
            value = Path(path).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"{key}_FILE: cannot read {path}: {exc.strerror}") from None
    if value and len(value) < 16:
        raise ConfigError(f"{key} must be at least 16 characters (use a long random string)")
    return value or None


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


def _sync_interval(env: Mapping[str, str], key: str, default: str) -> str:
    raw = env.get(key, "").strip().lower()
    if not raw:
        return default
    if not re.fullmatch(r"always|[1-9][0-9]{0,5}(ms|s|m|h)", raw):
        raise ConfigError(f"{key} must be `always` or a duration such as 100ms, 1s or 2m, got {raw!r}")
    return raw


def _namespace(env: Mapping[str, str], default: str) -> str:
    raw = env.get("MABREC_NAMESPACE", default).strip()
    # It names a JetStream stream, NATS subjects, a Ray namespace and actor names.
    if not re.fullmatch(r"[a-z][a-z0-9_]{0,39}", raw):
        raise ConfigError(f"MABREC_NAMESPACE must match [a-z][a-z0-9_]{{0,39}}, got {raw!r}")
    return raw
