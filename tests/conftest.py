"""Fixtures for real services. DATABASE_URL / NATS_URL point at running servers (CI sets them);
where they are unset, the session starts the embedded ones (the same code `mabrec up` uses), so
the suite passes on a fresh machine too. Every test gets its own database and namespace (stream
and subjects), so tests never collide, with each other or with anything else on the servers."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import pytest_asyncio
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from psycopg import sql

from bench.running import RunningSystem
from system.bus import stream
from system.core.settings import Settings
from system.local import servers
from system.local.processes import stop_pid
from system.local.runtime import Service

# Fixtures of their own module: headless Chromium (`browser`).
pytest_plugins = ["tests.browser"]

DATA = Path(__file__).parent / "data"
SMALL_CSV = DATA / "small_catalog.csv"
SMALL_JSONL = DATA / "small_catalog.jsonl"
# Lines the chaos tests measure (time to recover from each fault), shown after the run.
RECOVERY: list[str] = []


# The slowest modules first. `make test` runs two workers (pytest-xdist, `--dist loadfile`: a
# module's tests stay together, on one worker, sharing its system), each taking the next module
# as it frees up: started first, the long ones run side by side and the short ones fill the end.
# `--no-loadscope-reorder` keeps this order: by default xdist sorts modules by their number of
# tests, which started the 2-minute, 2-test bench report near the end, alone.
SLOWEST_FIRST = ("test_bench_report", "test_e2e", "test_chaos", "test_scaling", "test_deployment", "test_demo")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: a module keeps its order


def pytest_sessionfinish(session: pytest.Session) -> None:
    output = getattr(session.config, "workeroutput", None)
    if output is not None:  # an xdist worker: its lines go to the controller, which prints them
        output["recovery"] = list(RECOVERY)


def pytest_testnodedown(node: Any, error: object) -> None:
    """xdist's controller: a worker finished; keep its recovery lines."""
    RECOVERY.extend(getattr(node, "workeroutput", {}).get("recovery", []))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if RECOVERY:
        terminalreporter.section("time to recover (chaos and restart tests)")
        for line in RECOVERY:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Server URLs: from the environment, or embedded servers for this session."""
    started: list[Service] = []
    state = tmp_path_factory.mktemp("services")
    urls = {"database": os.environ.get("DATABASE_URL", ""), "nats": os.environ.get("NATS_URL", "")}
    if not urls["database"]:
        started.append(servers.start_postgres(state))
        urls["database"] = started[-1].url
    if not urls["nats"]:
        started.append(servers.start_nats(state, Settings()))
        urls["nats"] = started[-1].url
    yield urls
    for service in reversed(started):
        stop_pid(service.pid, signal.SIGINT)


def make_database(server_url: str) -> str:
    name = f"mabrec_test_{secrets.token_hex(6)}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return server_url.rsplit("/", 1)[0] + "/" + name


def drop_database(server_url: str, url: str) -> None:
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def database_url(services: dict[str, str]) -> Iterator[str]:
    """A fresh, empty database on the PostgreSQL server, dropped afterwards."""
    url = make_database(services["database"])
    yield url
    drop_database(services["database"], url)


@pytest.fixture
def namespace() -> str:
    return f"t{secrets.token_hex(5)}"


@pytest.fixture
def checkpoint_interval() -> float:
    """Override with @pytest.mark.parametrize("checkpoint_interval", [...]) where it matters."""
    return 0.2


@pytest.fixture
def settings(
    services: dict[str, str], database_url: str, namespace: str, tmp_path: Path, checkpoint_interval: float
) -> Settings:
    return Settings(
        database_url=database_url,
        nats_url=services["nats"],
        namespace=namespace,
        shards=2,
        checkpoint_interval=checkpoint_interval,
        state_dir=tmp_path / "state",
        dashboard=False,
    )


@pytest_asyncio.fixture
async def js(settings: Settings) -> AsyncIterator[JetStreamContext]:
    """A JetStream context with this test's streams created, deleted afterwards."""
    nc = await stream.connect(settings.nats_url or "", "tests")
    context = nc.jetstream()
    await stream.ensure_streams(context, settings)
    yield context
    for name in (settings.stream, settings.deadletter_stream):
        with contextlib.suppress(NotFoundError):  # a test deleted it already
            await context.delete_stream(name)
    await nc.close()


def system(state_dir: Path, **env: str) -> RunningSystem:
    """`mabrec up` as the end-to-end tests run it: 2 shards, no dashboard, quick checkpoints."""
    defaults = {"MABREC_DASHBOARD": "0", "MABREC_SHARDS": "2", "MABREC_CHECKPOINT_INTERVAL": "0.2"}
    return RunningSystem(state_dir, defaults | env)


@contextlib.contextmanager
def own_system(
    services: dict[str, str], tmp_path_factory: pytest.TempPathFactory, name: str, **env: str
) -> Iterator[RunningSystem]:
    """`system(...)` started on a database and a namespace of its own (the database dropped after)."""
    database = make_database(services["database"])
    try:
        namespace = f"{name.replace('-', '')[:4]}{secrets.token_hex(4)}"
        own = {"DATABASE_URL": database, "NATS_URL": services["nats"], "MABREC_NAMESPACE": namespace}
        with system(tmp_path_factory.mktemp(name), **own, **env) as started:
            yield started
    finally:
        drop_database(services["database"], database)
