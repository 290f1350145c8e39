"""Who may do what on NATS: one definition, from which both the embedded server's configuration
(system/local/servers.py) and compose's (`mabrec nats-config`, docker-compose.yml) are written.

Each of mabrec's processes connects as the user of its role, with the least it needs:
- `mabrec`: the supervisor and the CLI (they create streams, verify, erase): everything;
- `api`: the API actors, which face the internet: publish events, ask shards for slates;
- `shard`: take the shards' requests and spans, answer, read (and scrub) the event log;
- `router`: read the event log, send spans to shards, dead-letter what is malformed;
- `producer`: other services: publish feedback events, nothing else.

Replies are private: every user gets an inbox prefix of its own (`_INBOX_<user>`, which its
connections use, nats-py's `inbox_prefix`) and may subscribe to nothing else of `_INBOX*`, so no
user can overhear the answers to another's requests (slates, profiles, JetStream deliveries of
the event log). A shard answers the API's requests through NATS's `allow_responses` (one reply
to each request it received), without a right to publish on anyone's inbox. NATS's own advice
for private replies: https://docs.nats.io/running-a-nats-service/configuration/securing_nats/authorization
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from system.core.settings import Settings

MABREC, API, SHARD, ROUTER, PRODUCER = "mabrec", "api", "shard", "router", "producer"
USERS = (MABREC, API, SHARD, ROUTER, PRODUCER)
# The users mabrec's own processes connect as (the producer is for other services).
ROLES = (MABREC, API, SHARD, ROUTER)


@dataclass(frozen=True)
class Permissions:
    user: str
    publish: tuple[str, ...] | None  # None: any subject
    subscribe: tuple[str, ...] | None
    respond: bool = False  # may answer the requests it receives (NATS `allow_responses`)

    @property
    def inbox_prefix(self) -> str:
        return inbox_prefix(self.user)


def inbox_prefix(user: str) -> str:
    """The subjects the replies to a user's requests come on: `<prefix>.<token>...`."""
    return f"_INBOX_{user}"


def _reads(stream: str) -> tuple[str, ...]:
    """The JetStream API calls of a reader of `stream` (system/bus/stream.py's cursor)."""
    api = "$JS.API"
    return (
        f"{api}.STREAM.INFO.{stream}",
        f"{api}.CONSUMER.CREATE.{stream}",
        f"{api}.CONSUMER.CREATE.{stream}.>",
        f"{api}.CONSUMER.MSG.NEXT.{stream}.*",
        f"{api}.CONSUMER.INFO.{stream}.*",
        f"{api}.CONSUMER.DELETE.{stream}.*",
    )


def permissions(settings: Settings) -> dict[str, Permissions]:
    """Every user's rights, for the namespace of `settings` (its subjects and streams)."""
    ns, events, dlq = settings.namespace, settings.stream, settings.deadletter_stream
    shard_rpc, shard_apply = f"{ns}.shard.*.rpc", f"{ns}.shard.*.apply"
    own_inbox = {user: (f"{inbox_prefix(user)}.>",) for user in USERS}
    return {
        MABREC: Permissions(MABREC, None, None),
        API: Permissions(API, (f"{ns}.events.api", shard_rpc), own_inbox[API]),
        SHARD: Permissions(
            SHARD,
            (*_reads(events), *_reads(dlq), f"$JS.API.STREAM.MSG.DELETE.{events}", f"$JS.API.STREAM.MSG.DELETE.{dlq}"),
            (shard_rpc, shard_apply, *own_inbox[SHARD]),
            respond=True,
        ),
        ROUTER: Permissions(ROUTER, (*_reads(events), shard_apply, settings.deadletter_subject), own_inbox[ROUTER]),
        PRODUCER: Permissions(PRODUCER, (settings.events_subject, f"{settings.events_subject}.>"), own_inbox[PRODUCER]),
    }


# How compose's configuration names each user's password: environment variables the server
# reads (`$VAR` in its configuration), set from .env.
PASSWORD_VARIABLES = {
    MABREC: "MABREC_NATS_PASSWORD",
    API: "NATS_API_PASSWORD",
    SHARD: "NATS_SHARD_PASSWORD",
    ROUTER: "NATS_ROUTER_PASSWORD",
    PRODUCER: "NATS_PRODUCER_PASSWORD",
}


# nats-server reads a variable's value from its environment as a configuration value, not as a
# string: "1K..." is a size (and a parse error), "true" a boolean. A password it reads as a string
# starts with a letter and holds letters, digits, '_' and '-' (URL-safe, as generated).
READABLE_PASSWORD = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
NATS_KEYWORDS = frozenset({"true", "false", "yes", "no", "on", "off"})


def unreadable_passwords(env: Mapping[str, str]) -> list[str]:
    """The password variables set in `env` whose value nats-server would not read as a string."""
    return [
        variable
        for variable in PASSWORD_VARIABLES.values()
        if (value := env.get(variable)) is not None
        and (not READABLE_PASSWORD.fullmatch(value) or value.lower() in NATS_KEYWORDS)
    ]


def literal(password: str) -> str:
    """A password written into the configuration itself (the embedded server's, mode 0600)."""
    return json.dumps(password)


def variable(user: str) -> str:
    """A password the server takes from its environment (compose's)."""
    return f"${PASSWORD_VARIABLES[user]}"


def server_config(settings: Settings, password: Callable[[str], str]) -> str:
    """The nats-server configuration: how often JetStream forces the log to disk (Settings'
    `nats_sync`; see the README, "Durability"), and the users with their rights. `password(user)`
    gives each user's password as it goes in the file (`literal` or `variable`)."""
    lines = [
        "# Written by mabrec from system/core/access.py (`mabrec nats-config`): do not edit.",
        f"jetstream {{ sync_interval: {settings.nats_sync} }}",
        "authorization {",
        "  users = [",
    ]
    for user, rights in permissions(settings).items():
        entry: dict[str, object] = {}
        if rights.publish is not None:
            entry["publish"] = {"allow": list(rights.publish)}
        if rights.subscribe is not None:
            entry["subscribe"] = {"allow": list(rights.subscribe)}
        if rights.respond:
            entry["allow_responses"] = True
        fields = f"user: {json.dumps(user)}, password: {password(user)}"
        if entry:
            fields += f", permissions: {json.dumps(entry)}"
        lines.append(f"    {{{fields}}}")
    lines += ["  ]", "}", ""]
    return "\n".join(lines)


def role_urls(url: str, passwords: Mapping[str, str]) -> dict[str, str]:
    """`url` (the mabrec user's) as each user would connect: the same server, their credentials."""
    scheme, rest = url.split("://", 1)
    host = rest.rsplit("@", 1)[-1]
    return {user: f"{scheme}://{user}:{password}@{host}" for user, password in passwords.items()}
