from __future__ import annotations

from pathlib import Path

import pytest

from system.core.errors import ConfigError
from system.core.policy_config import PolicyConfig
from system.core.settings import Settings


def test_defaults() -> None:
    s = Settings.from_env({})
    assert (s.shards, s.host, s.port, s.checkpoint_interval, s.log_level) == (0, "127.0.0.1", 8000, 1.0, "INFO")
    assert not s.shards_given  # the supervisor decides: as last left, else one per CPU
    assert s.database_url is None and s.nats_url is None and s.ray_address is None
    assert s.state_dir == Path(".mabrec")
    assert (s.stream, s.events_subject, s.deadletter_subject) == ("MABREC_EVENTS", "mabrec.events", "mabrec.deadletter")


def test_reads_and_casts_environment() -> None:
    s = Settings.from_env(
        {
            "DATABASE_URL": "postgresql://u@db:5432/x",
            "NATS_URL": "nats://bus:4222",
            "RAY_ADDRESS": "10.0.0.1:6379",
            "MABREC_SHARDS": "8",
            "MABREC_PORT": "9000",
            "MABREC_CHECKPOINT_INTERVAL": "0.5",
            "MABREC_LOG_LEVEL": "debug",
            "MABREC_NAMESPACE": "prod_eu",
            "MABREC_DASHBOARD": "off",
            "MABREC_NATS_SYNC": "500ms",
            "NATS_API_URL": "nats://api:pw@bus:4222",
        }
    )
    assert (s.shards, s.port, s.checkpoint_interval, s.log_level, s.dashboard) == (8, 9000, 0.5, "DEBUG", False)
    assert s.stream == "PROD_EU_EVENTS" and s.events_subject == "prod_eu.events"
    assert s.nats_sync == "500ms" and Settings.from_env({}).nats_sync == "always"
    # Each role's own NATS login where one is given; the mabrec user's otherwise.
    assert (s.nats_url_for("api"), s.nats_url_for("shard")) == ("nats://api:pw@bus:4222", "nats://bus:4222")


def test_policy_settings_reach_the_policy() -> None:
    assert Settings.from_env({}).policy() == PolicyConfig()  # the tuned defaults
    policy = Settings.from_env({"MABREC_EXPLORATION": "2.5", "MABREC_FORGET_HALF_LIFE": "0"}).policy()
    assert (policy.exploration, policy.forget_half_life) == (2.5, 0.0)
    assert (PolicyConfig.exploration, PolicyConfig.forget_half_life) != (2.5, 0.0)  # not the defaults


def test_cli_overrides_win_over_environment() -> None:
    s = Settings.from_env({"MABREC_SHARDS": "8"}, shards=3, port=None)
    assert s.shards == 3 and s.port == 8000


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"MABREC_SHARDS": "four"}, "MABREC_SHARDS"),
        ({"MABREC_SHARDS": "0"}, "MABREC_SHARDS"),
        ({"MABREC_SHARDS": "1_0"}, "MABREC_SHARDS"),
        ({"MABREC_SHARDS": "\u0663"}, "MABREC_SHARDS"),  # an Arabic-Indic 3: int() takes it, we do not
        ({"MABREC_CHECKPOINT_INTERVAL": "nan"}, "MABREC_CHECKPOINT_INTERVAL"),
        ({"MABREC_PORT": "70000"}, "MABREC_PORT"),
        ({"MABREC_CHECKPOINT_INTERVAL": "soon"}, "MABREC_CHECKPOINT_INTERVAL"),
        ({"MABREC_LOG_LEVEL": "LOUD"}, "MABREC_LOG_LEVEL"),
        ({"DATABASE_URL": "mysql://x"}, "DATABASE_URL"),
        ({"NATS_URL": "http://x"}, "NATS_URL"),
        ({"MABREC_NAMESPACE": "Bad-Name"}, "MABREC_NAMESPACE"),
        ({"MABREC_DASHBOARD": "maybe"}, "MABREC_DASHBOARD"),
        ({"MABREC_EXPLORATION": "0"}, "MABREC_EXPLORATION"),
        ({"MABREC_FORGET_HALF_LIFE": "-1"}, "MABREC_FORGET_HALF_LIFE"),
        ({"MABREC_NATS_SYNC": "never"}, "MABREC_NATS_SYNC"),
        ({"MABREC_NATS_SYNC": "0s"}, "MABREC_NATS_SYNC"),
        ({"NATS_SHARD_URL": "shard:pw@bus"}, "NATS_SHARD_URL"),
    ],
)
def test_invalid_values_fail_fast_naming_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError) as err:
        Settings.from_env(env)
    assert named in err.value.detail


def test_invalid_cli_override_is_rejected() -> None:
    with pytest.raises(ConfigError, match="MABREC_SHARDS"):
        Settings.from_env({}, shards=0)
