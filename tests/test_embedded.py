"""The embedded servers' secrets: the local Ray private per state dir and token-authenticated,
NATS with users and per-subject permissions, PostgreSQL behind a generated password."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import stat
import sys
from pathlib import Path

import nats
import psycopg
import pytest
from nats.errors import Error as NatsError

from system.bus import dataplane, stream
from system.core.settings import Settings
from system.local.processes import free_port, spawn, stop_pid, wait_for_port
from system.local.runtime import Service
from system.local.servers import PG_PASSWORD_FILE, PRODUCER_URL_FILE, ray_environment, start_nats, start_postgres

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


def compose_nats(tmp_path: Path) -> tuple[Service, str]:
    """nats-server as docker-compose.yml runs it (deploy/nats/nats.conf, passwords from the
    environment), on loopback: the mabrec user's URL, and the producer's."""
    passwords = {"MABREC_NATS_PASSWORD": secrets.token_urlsafe(16), "NATS_PRODUCER_PASSWORD": secrets.token_urlsafe(16)}
    port = free_port()
    command = [
        str(Path(sys.executable).parent / "nats-server"), "-c", str(ROOT / "deploy" / "nats" / "nats.conf"),
        "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(tmp_path / "data"),
    ]  # fmt: skip
    proc = spawn(command, tmp_path / "nats.log", env={**os.environ, **passwords})
    wait_for_port(port, 15, proc, tmp_path / "nats.log")
    url = f"nats://mabrec:{passwords['MABREC_NATS_PASSWORD']}@127.0.0.1:{port}"
    return Service("nats", proc.pid, url), f"nats://producer:{passwords['NATS_PRODUCER_PASSWORD']}@127.0.0.1:{port}"


@pytest.mark.integration
@pytest.mark.parametrize("shape", ["embedded", "compose"])
async def test_nats_refuses_a_producer_on_the_shard_subjects_and_the_event_log(tmp_path: Path, shape: str) -> None:
    namespace = "hard" if shape == "embedded" else "mabrec"  # compose runs the default namespace
    if shape == "embedded":
        nats_server = start_nats(tmp_path, namespace)
        producer_url = (tmp_path / PRODUCER_URL_FILE).read_text().strip()
        assert stat.S_IMODE((tmp_path / PRODUCER_URL_FILE).stat().st_mode) == 0o600
        assert stat.S_IMODE((tmp_path / "nats" / "nats.conf").stat().st_mode) == 0o600
    else:
        nats_server, producer_url = compose_nats(tmp_path)
    try:
        # No credentials, no connection (spoken as NATS's protocol is, to see the server's own word).
        host, port = nats_server.url.split("@")[1].split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        assert (await reader.readline()).startswith(b"INFO ")
        writer.write(b'CONNECT {"verbose": false, "pedantic": false}\r\nPING\r\n')
        assert b"Authorization Violation" in await asyncio.wait_for(reader.readline(), 10)
        writer.close()
        await writer.wait_closed()
        settings = Settings(namespace=namespace)
        mabrec = await stream.connect(nats_server.url, "mabrec-test")
        await stream.ensure_streams(mabrec.jetstream(), settings)
        apply = dataplane.apply_subject(namespace, 0)
        received = await mabrec.subscribe(apply)
        await mabrec.flush()

        refused: list[str] = []
        violation = asyncio.Event()

        async def on_error(exc: Exception) -> None:
            refused.append(str(exc))
            violation.set()

        producer = await nats.connect(producer_url, error_cb=on_error, max_reconnect_attempts=0)
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
        stop_pid(nats_server.pid, signal.SIGTERM)


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
