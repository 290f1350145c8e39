"""The embedded servers' secrets: the local Ray private per state dir and token-authenticated,
NATS with users and per-subject permissions, PostgreSQL behind a generated password."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import nats
import psycopg
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import Error as NatsError

from system.bus import dataplane, stream
from system.bus.publisher import Publisher
from system.core import access
from system.core.events import CLICKED, Event
from system.core.settings import Settings
from system.local.processes import free_port, spawn, stop_pid, wait_for_port
from system.local.runtime import Service
from system.local.servers import (
    PG_PASSWORD_FILE,
    PRODUCER_URL_FILE,
    nats_passwords,
    ray_environment,
    start_nats,
    start_postgres,
)
from tests.pipeline import start_pipeline, stop_pipeline, wait_for
from tests.test_deployment import COMPOSE, compose_command

ROOT = Path(__file__).resolve().parent.parent


def test_the_ray_token_is_made_once_per_state_dir_and_kept_private(tmp_path: Path) -> None:
    first = ray_environment(tmp_path / "a")
    token = Path(first["RAY_AUTH_TOKEN_PATH"])
    assert first["RAY_AUTH_MODE"] == "token" and token.parent == (tmp_path / "a").resolve()
    secret = token.read_text()
    assert len(secret.strip()) >= 40
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert ray_environment(tmp_path / "a") == first and token.read_text() == secret  # reused, not remade
    other = ray_environment(tmp_path / "b")
    assert Path(other["RAY_AUTH_TOKEN_PATH"]).read_text() != secret
    assert other["RAY_TMPDIR"] != first["RAY_TMPDIR"]
    assert list(token.parent.iterdir()) == [token]  # no temporary file left behind


# --- the embedded NATS and PostgreSQL: nobody in without the generated secrets ------------------


def nats_server(shape: str, tmp_path: Path, namespace: str) -> tuple[Service, dict[str, str]]:
    """nats-server as `mabrec up` embeds it, or as docker-compose.yml runs it (the configuration
    `mabrec nats-config` writes, the passwords in the server's environment), on loopback: the
    server, and each user's URL."""
    if shape == "embedded":
        server = start_nats(tmp_path, Settings(namespace=namespace))
        return server, access.role_urls(server.url, nats_passwords(tmp_path))
    passwords = {user: "p" + secrets.token_urlsafe(16) for user in access.USERS}  # as the README says
    config = tmp_path / "nats.conf"
    writer = compose_command("nats-config")  # compose's own command, its output where the test wants it
    writer = [str(Path(sys.executable).parent / writer[0]), *writer[1:]]
    writer[writer.index("/etc/nats/nats.conf")] = str(config)
    env = {access.PASSWORD_VARIABLES[user]: password for user, password in passwords.items()}
    written = subprocess.run(  # with the passwords, as compose runs it: checked, not written
        writer, env={**os.environ, **env, "MABREC_NAMESPACE": namespace}, capture_output=True, text=True, check=True
    )
    assert written.stdout == "" and "$NATS_SHARD_PASSWORD" in config.read_text()  # no secret in the file
    port = free_port()
    command = [
        str(Path(sys.executable).parent / "nats-server"), *compose_command("nats"),
        "-a", "127.0.0.1", "-p", str(port), "-sd", str(tmp_path / "data"),
    ]  # fmt: skip
    command[command.index("/etc/nats/nats.conf")] = str(config)
    monitor = free_port()
    command[command.index("-m") + 1] = str(monitor)
    assert set(env) <= set(COMPOSE["services"]["nats"]["environment"])
    assert set(env) <= set(COMPOSE["services"]["nats-config"]["environment"])
    proc = spawn(command, tmp_path / "nats.log", env={**os.environ, **env})
    wait_for_port(port, 15, proc, tmp_path / "nats.log")
    urls = access.role_urls(f"nats://127.0.0.1:{port}", passwords)
    return Service("nats", proc.pid, urls[access.MABREC], f"http://127.0.0.1:{monitor}"), urls


def test_nats_config_refuses_a_password_nats_server_would_not_read_as_one(tmp_path: Path) -> None:
    """nats-server parses a variable's value from its environment as a configuration value: a
    password "1K..." is a size and a parse error (the compose test failed that way now and then,
    on passwords that happened to start so). compose's nats-config refuses it, naming it; the
    README's generator always makes readable ones."""
    good = {variable: "p" + secrets.token_urlsafe(32) for variable in access.PASSWORD_VARIABLES.values()}
    assert access.unreadable_passwords(good) == []
    for bad in ("1Kx-abc", "7", "-1", "true", "pass word", "p#ss"):
        assert access.unreadable_passwords({**good, "NATS_PRODUCER_PASSWORD": bad}) == ["NATS_PRODUCER_PASSWORD"], bad
    writer = compose_command("nats-config")
    writer = [str(Path(sys.executable).parent / writer[0]), *writer[1:]]
    writer[writer.index("/etc/nats/nats.conf")] = str(tmp_path / "nats.conf")
    refused = subprocess.run(
        writer, env={**os.environ, **good, "NATS_SHARD_PASSWORD": "9Gq"}, capture_output=True, text=True
    )
    assert refused.returncode == 2 and "NATS_SHARD_PASSWORD" in refused.stderr and "letter" in refused.stderr
    assert "9Gq" not in refused.stderr and not (tmp_path / "nats.conf").exists()


@pytest.mark.integration
@pytest.mark.parametrize("shape", ["embedded", "compose"])
async def test_nats_refuses_a_producer_on_the_shard_subjects_and_the_event_log(tmp_path: Path, shape: str) -> None:
    namespace = f"hard{secrets.token_hex(3)}"  # any namespace: both configurations are written for it
    server, urls = nats_server(shape, tmp_path, namespace)
    if shape == "embedded":
        assert (tmp_path / PRODUCER_URL_FILE).read_text().strip() == urls[access.PRODUCER]
        assert stat.S_IMODE((tmp_path / PRODUCER_URL_FILE).stat().st_mode) == 0o600
        assert stat.S_IMODE((tmp_path / "nats" / "nats.conf").stat().st_mode) == 0o600
    try:
        # An acknowledged event is on disk: JetStream syncs every write (README, "Durability").
        assert server.monitor_url is not None
        async with httpx.AsyncClient(timeout=10) as http:
            varz = (await http.get(f"{server.monitor_url}/varz")).json()
        assert varz["jetstream"]["config"]["sync_always"] is True
        # No credentials, no connection (spoken as NATS's protocol is, to see the server's own word).
        host, port = server.url.split("@")[1].split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        assert (await reader.readline()).startswith(b"INFO ")
        writer.write(b'CONNECT {"verbose": false, "pedantic": false}\r\nPING\r\n')
        assert b"Authorization Violation" in await asyncio.wait_for(reader.readline(), 10)
        writer.close()
        await writer.wait_closed()
        settings = Settings(namespace=namespace)
        mabrec = await stream.connect(server.url, "mabrec-test")
        await stream.ensure_streams(mabrec.jetstream(), settings)
        apply = dataplane.apply_subject(namespace, 0)
        received = await mabrec.subscribe(apply)
        await mabrec.flush()

        refused: list[str] = []
        violation = asyncio.Event()

        async def on_error(exc: Exception) -> None:
            refused.append(str(exc))
            violation.set()

        producer = await nats.connect(
            urls[access.PRODUCER], error_cb=on_error, max_reconnect_attempts=0, inbox_prefix="_INBOX_producer"
        )
        # What producers are for: feedback events, acknowledged by JetStream.
        ack = await producer.jetstream().publish(settings.events_subject, b'{"event_type": "seen"}')
        assert ack.stream == settings.stream and ack.seq == 1
        # A forged span: NATS refuses it, and the shard's subject never sees it.
        await producer.publish(apply, dataplane.encode_apply(0, 10**9, []))
        await asyncio.wait_for(violation.wait(), 10)
        assert any("permissions violation" in r.lower() and apply in r for r in refused), refused
        await mabrec.publish(apply, b"marker")  # what the shard's subject gets next, it got first
        assert (await received.next_msg(timeout=5)).data == b"marker"
        # Nor may a producer read the shards' traffic or the event log.
        violation.clear()
        await producer.subscribe(f"{namespace}.shard.>")
        await asyncio.wait_for(violation.wait(), 10)
        with pytest.raises((NatsError, TimeoutError)):
            await producer.jetstream(timeout=1).stream_info(settings.stream)
        await producer.close()
        await mabrec.close()
    finally:
        stop_pid(server.pid, signal.SIGTERM)


@pytest.mark.integration
@pytest.mark.parametrize("shape", ["embedded", "compose"])
async def test_no_user_overhears_another_while_slates_clicks_profiles_and_an_erasure_flow(
    tmp_path: Path, shape: str, services: dict[str, str], database_url: str
) -> None:
    """Each of mabrec's processes logs in as its role (shards, router, API) and a producer as
    itself. An eavesdropper of every user but mabrec's own subscribes to every subject its rights
    allow, wildcards included, while the shards serve slates and profiles, apply clicks, and
    erase a user: each hears only what is addressed to it (a shard its requests and spans) and
    the replies to its own user's requests; a subscription beyond its rights is refused."""
    namespace = f"ovh{secrets.token_hex(3)}"
    server, urls = nats_server(shape, tmp_path, namespace)
    settings = Settings(
        database_url=database_url,
        nats_url=urls[access.MABREC],
        nats_api_url=urls[access.API],
        nats_shard_url=urls[access.SHARD],
        nats_router_url=urls[access.ROUTER],
        namespace=namespace,
        shards=2,
        checkpoint_interval=0.2,
    )
    rights = access.permissions(settings)
    heard: dict[str, list[str]] = {user: [] for user in rights if user != access.MABREC}
    refused: dict[str, list[str]] = {user: [] for user in heard}
    listeners: list[NATS] = []
    try:
        mabrec = await stream.connect(server.url, "mabrec-test")
        js = mabrec.jetstream()
        await stream.ensure_streams(js, settings)
        for user in heard:

            async def on_error(exc: Exception, user: str = user) -> None:
                refused[user].append(str(exc))

            nc = await nats.connect(
                urls[user], error_cb=on_error, max_reconnect_attempts=0, inbox_prefix=access.inbox_prefix(user)
            )
            listeners.append(nc)
            others = [f"{access.inbox_prefix(u)}.>" for u in access.USERS if u != user]
            for pattern in [*(rights[user].subscribe or ()), "_INBOX.>", ">", *others]:

                async def overheard(msg: Msg, user: str = user, pattern: str = pattern) -> None:
                    heard[user].append(pattern)  # (a JetStream delivery keeps its own subject)

                await nc.subscribe(pattern, cb=overheard)
            await nc.flush()
        pipeline = await start_pipeline(settings, js)
        try:
            api = await stream.connect(settings.nats_url_for(access.API), "test-api", access.API)
            client = dataplane.ShardClient(api, namespace)
            publisher = Publisher(api)
            publisher.start()
            users = [f"listener-{i}" for i in range(8)]
            clicks = [Event(u, CLICKED, (2 + i,), f"c-{i}", None, None) for i, u in enumerate(users)]
            last = await publisher.publish(f"{settings.events_subject}.api", [e.encode() for e in clicks], 10)
            producer = listeners[list(heard).index(access.PRODUCER)]
            own_acks = 3
            for i in range(own_acks):
                await producer.jetstream().publish(
                    settings.events_subject, Event(users[0], CLICKED, (9,), f"p-{i}", None, None).encode()
                )
            await pipeline.settle(last + own_acks)
            for uxid in users:
                await client.slate(pipeline.slot_map.shard_of(uxid), uxid, 5)
                profile = await client.profile(pipeline.slot_map.shard_of(uxid), uxid)
                assert any(row[0] == 2 + users.index(uxid) for row in profile.rows)
            gone = users[-1]
            shard = pipeline.shard_of(gone)
            await client.erase(pipeline.slot_map.shard_of(gone), gone)
            await wait_for(lambda: shard._scrubber.done == 1, 30)  # read and scrubbed the log as `shard`
            await publisher.drain()
            await api.close()
        finally:
            await stop_pipeline(pipeline)
        for nc in listeners:
            await nc.flush()
        await mabrec.close()
    finally:
        for nc in listeners:
            await nc.close()
        stop_pid(server.pid, signal.SIGTERM)
    for user, patterns in heard.items():
        # What a user may listen to: its own inbox, and for a shard the shards' own subjects.
        mine = {f"{access.inbox_prefix(user)}.>"} | (
            {f"{namespace}.shard.*.rpc", f"{namespace}.shard.*.apply"} if user == access.SHARD else set()
        )
        assert set(rights[user].subscribe or ()) == mine, user
        assert patterns, f"{user} heard nothing: the traffic did not reach its subjects"
        assert set(patterns) <= mine, (user, set(patterns) - mine)
        # Every subscription past its rights refused (the other users' inboxes, all inboxes, all).
        assert sum("permissions violation" in r.lower() for r in refused[user]) == len(access.USERS) + 1, refused[user]
    # The producer: the acknowledgements of its own publishes, nothing else.
    assert len(heard[access.PRODUCER]) == own_acks, heard[access.PRODUCER]


@pytest.mark.integration
def test_postgres_takes_only_the_generated_password(tmp_path: Path) -> None:
    pg = start_postgres(tmp_path)
    try:
        password = (tmp_path / PG_PASSWORD_FILE).read_text().strip()
        assert stat.S_IMODE((tmp_path / PG_PASSWORD_FILE).stat().st_mode) == 0o600
        assert f":{password}@" in pg.url
        psycopg.connect(pg.url).close()
        without = pg.url.replace(f":{password}@", "@")
        for url in (without, pg.url.replace(password, "guess")):
            with pytest.raises(psycopg.OperationalError, match="password"):
                psycopg.connect(url, connect_timeout=5)
        with pytest.raises(psycopg.OperationalError, match="password"):
            psycopg.connect(without + "?replication=database", connect_timeout=5)
        hba = (tmp_path / "postgres" / "pg_hba.conf").read_text()
        assert "trust" not in hba and "scram-sha-256" in hba
        assert stat.S_IMODE((tmp_path / "postgres" / "server.log").stat().st_mode) == 0o600
    finally:
        stop_pid(pg.pid, signal.SIGINT)
    # A data dir from before passwords (its secret gone): it gets a new password, and the old one fails.
    (tmp_path / PG_PASSWORD_FILE).unlink()
    again = start_postgres(tmp_path)
    try:
        renewed = (tmp_path / PG_PASSWORD_FILE).read_text().strip()
        assert renewed != password
        psycopg.connect(again.url).close()
        with pytest.raises(psycopg.OperationalError, match="password"):
            psycopg.connect(again.url.replace(renewed, password), connect_timeout=5)
        assert "trust" not in (tmp_path / "postgres" / "pg_hba.conf").read_text()
    finally:
        stop_pid(again.pid, signal.SIGINT)
