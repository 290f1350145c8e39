"""The whole system, as a user runs it: `mabrec up` (Ray shards, the event consumer, the API)
against real PostgreSQL and NATS JetStream, driven over HTTP and NATS."""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson
import psycopg
import pytest

from system import bus
from system.catalog import read_movies
from system.embedded import Runtime, pid_alive, ray_tmpdir
from tests.conftest import SMALL_JSONL, drop_database, make_database
from tests.running import MABREC, RunningSystem

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

SHIPPED = Path(__file__).resolve().parent.parent / "data" / "catalog.csv.gz"
GENRES = {m.id: set(m.facets.get("genres", [])) for m in read_movies(SHIPPED)}
CRIME = sorted(m for m, g in GENRES.items() if "Crime" in g)


def crime_share(movies: list[dict]) -> float:
    return float(np.mean(["Crime" in {g["name"] for g in m["genres"]} for m in movies]))


@pytest.fixture(scope="module")
def system(services: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningSystem]:
    database = make_database(services["database"])
    namespace = f"e2e{secrets.token_hex(4)}"
    running = RunningSystem(
        tmp_path_factory.mktemp("e2e"),
        {"DATABASE_URL": database, "NATS_URL": services["nats"], "MABREC_NAMESPACE": namespace},
    ).start()
    yield running
    code = running.stop()
    drop_database(services["database"], database)
    assert code == 0, running.tail()


def publish(system: RunningSystem, payloads: list[bytes], subject: str | None = None) -> None:
    async def go() -> None:
        assert system.runtime is not None
        nc = await bus.connect(system.runtime.nats_url, "test-publisher")
        js = nc.jetstream()
        for payload in payloads:
            await js.publish(subject or f"{system.runtime.namespace}.events", payload)
        await nc.close()

    asyncio.run(go())


def wait_for_profile(system: RunningSystem, uxid: str, clicks: int, timeout: float = 5.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        profile = system.get("/api/profile", uxid).json()
        if profile["clicks"] >= clicks or time.monotonic() > deadline:
            return profile
        time.sleep(0.01)


def test_list_paginates_without_overlap(system: RunningSystem) -> None:
    pages = [system.get("/api/movies", params={"page": p, "per_page": 50}) for p in (1, 2, 3)]
    assert all(r.status_code == 200 for r in pages)
    assert pages[0].headers["x-total-count"] == "9634"
    ids = [[m["id"] for m in r.json()] for r in pages]
    assert all(len(page) == 50 for page in ids)
    flat = [i for page in ids for i in page]
    assert flat == sorted(flat) and len(set(flat)) == 150
    last = system.get("/api/movies", params={"page": 193, "per_page": 50}).json()
    assert [m["id"] for m in last] == sorted(GENRES)[9600:]
    assert system.get("/api/movies", params={"page": 1000}).json() == []


def test_a_movie_has_its_genres_in_the_original_shape(system: RunningSystem) -> None:
    movie = system.get("/api/movies/2").json()
    assert movie["name"] == "The Godfather" and movie["rating"] == 9.2 and movie["duration"] == 175
    assert {g["name"] for g in movie["genres"]} == {"Crime", "Drama"} and all(
        isinstance(g["id"], int) for g in movie["genres"]
    )
    assert set(movie) >= {
        "id",
        "name",
        "description",
        "rating",
        "votes",
        "duration",
        "duration_unit",
        "link",
        "genres",
        "directors",
        "actors",
    }
    listed = system.get("/api/movies", params={"per_page": 2}).json()[1]
    assert listed == movie


def test_a_new_user_gets_a_full_slate_of_distinct_movies(system: RunningSystem) -> None:
    response = system.get("/api/recommendations/movies", f"new-{secrets.token_hex(4)}")
    assert response.status_code == 200 and response.headers["x-mabrec-source"] == "personal"
    slate = response.json()
    assert len(slate) == 10 and len({m["id"] for m in slate}) == 10
    assert all(m["genres"] for m in slate) and response.headers["x-recommendation-id"]
    assert all(m["reason"] in ("popular", "something new") for m in slate)  # a newcomer: nothing liked yet
    assert len(system.get("/api/recommendations/movies", "someone", params={"limit": 25}).json()) == 25


def test_twenty_crime_clicks_make_the_next_slates_mostly_crime(system: RunningSystem) -> None:
    uxid = f"crime-fan-{secrets.token_hex(4)}"
    rng = np.random.default_rng(2026)
    opened = rng.choice(CRIME[200:], 20, replace=False)  # not the famous ones
    for movie in opened:
        assert system.get(f"/api/movies/{movie}", uxid).status_code == 200
    clicked_at = time.monotonic()
    profile = wait_for_profile(system, uxid, 20, timeout=1.0)
    assert profile["clicks"] == 20, "the clicks did not reach the user's state within a second"
    assert time.monotonic() - clicked_at < 1.0
    slates = [system.get("/api/recommendations/movies", uxid).json() for _ in range(5)]
    shares = [crime_share(slate) for slate in slates]
    assert np.mean(shares) >= 0.6, shares  # the catalog's base rate is 21%
    assert sum(m["reason"] == "you like Crime" for slate in slates for m in slate) >= 20
    crime = next(f for f in profile["facets"] if f["name"] == "Crime")
    assert (crime["alpha"], crime["beta"]) == (21, 1)


def test_an_event_in_the_original_shape_published_on_nats_changes_the_user(system: RunningSystem) -> None:
    uxid = f"nats-{secrets.token_hex(4)}"
    event = {"event_type": "clicked", "entity_type": "movies", "entity_id": 42, "user_id": uxid}
    publish(system, [orjson.dumps(event)])
    profile = wait_for_profile(system, uxid, 1)
    assert [(m["id"], m["alpha"], m["beta"]) for m in profile["movies"]] == [(42, 2, 1)]


def test_a_malformed_nats_event_is_dead_lettered_and_the_next_good_one_applies(system: RunningSystem) -> None:
    uxid = f"dlq-{secrets.token_hex(4)}"
    before = system.get("/api/status").json()["consumer"]["dead_letters"]
    good = {"event_type": "clicked", "entity_type": "movies", "entity_id": 7, "user_id": uxid}
    publish(system, [b"{definitely not json", orjson.dumps({**good, "event_type": "purchased"}), orjson.dumps(good)])
    profile = wait_for_profile(system, uxid, 1)
    assert [(m["id"], m["alpha"]) for m in profile["movies"]] == [(7, 2)]
    deadline = time.monotonic() + 5
    while True:  # the health loop refreshes the consumer's counters every second
        after = system.get("/api/status").json()["consumer"]["dead_letters"]
        if after.get("invalid", 0) > before.get("invalid", 0) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert after.get("not_json", 0) == before.get("not_json", 0) + 1
    assert after.get("invalid", 0) == before.get("invalid", 0) + 1
    assert 'mabrec_events_dead_lettered_total{reason="not_json"}' in system.get("/metrics").text


def test_events_posted_over_http_are_applied_once(system: RunningSystem) -> None:
    uxid = f"http-{secrets.token_hex(4)}"
    batch = [
        {"event_type": "seen", "entity_ids": [1, 2, 3], "user_id": uxid, "event_id": "imp-1"},
        {"event_type": "clicked", "entity_id": 2, "user_id": uxid, "event_id": "clk-1"},
    ]
    response = system.http.post("/api/events", json=batch)  # type: ignore[union-attr]
    assert response.status_code == 202 and response.json()["accepted"] == 2
    again = system.http.post("/api/events", json=batch)  # type: ignore[union-attr]  # a client's retry
    assert again.status_code == 202
    profile = wait_for_profile(system, uxid, 1)
    time.sleep(0.5)
    profile = system.get("/api/profile", uxid).json()
    assert {m["id"]: (m["alpha"], m["beta"]) for m in profile["movies"]} == {1: (1, 2), 2: (2, 2), 3: (1, 2)}


@pytest.mark.parametrize(
    ("method", "path", "uxid", "params", "status", "says"),
    [
        ("GET", "/api/recommendations/movies", None, {}, 400, "uxid header is required"),
        ("GET", "/api/recommendations/movies", "x" * 129, {}, 400, "uxid must be"),
        ("GET", "/api/recommendations/movies", "u", {"limit": "0"}, 400, "limit must be"),
        ("GET", "/api/recommendations/movies", "u", {"limit": "many"}, 400, "limit must be"),
        ("GET", "/api/recommendations/movies", "u", {"limit": "101"}, 400, "limit must be"),
        ("GET", "/api/movies", None, {"per_page": "0"}, 400, "per_page must be"),
        ("GET", "/api/movies", None, {"per_page": "101"}, 400, "per_page must be"),
        ("GET", "/api/movies", None, {"page": "-1"}, 400, "page must be"),
        ("GET", "/api/movies/abc", None, {}, 400, "must be an integer"),
        ("GET", "/api/movies/1.5", None, {}, 400, "must be an integer"),
        ("GET", "/api/movies/99999999", None, {}, 404, "no movie with id"),
        ("GET", "/api/movies/2", "", {}, 400, "uxid must be"),
        ("GET", "/api/profile", None, {}, 400, "uxid header is required"),
        ("GET", "/api/nothing-here", None, {}, 404, "Not Found"),
        ("DELETE", "/api/movies/2", None, {}, 405, "Method Not Allowed"),
    ],
)
def test_bad_input_gets_a_clear_4xx_json_error(
    system: RunningSystem, method: str, path: str, uxid: str | None, params: dict, status: int, says: str
) -> None:
    headers = {"uxid": uxid} if uxid is not None else {}
    response = system.http.request(method, path, headers=headers, params=params)  # type: ignore[union-attr]
    assert response.status_code == status
    body = response.json()
    assert set(body) >= {"error", "detail"} and says in body["detail"]


def test_bad_event_batches_are_refused_whole(system: RunningSystem) -> None:
    uxid = f"bad-batch-{secrets.token_hex(4)}"
    good = {"event_type": "clicked", "entity_id": 5, "user_id": uxid}
    response = system.http.post("/api/events", json=[good, {"event_type": "seen", "user_id": uxid}])  # type: ignore[union-attr]
    assert response.status_code == 400 and response.json()["errors"][0]["index"] == 1
    assert system.http.post("/api/events", content=b"[{").status_code == 400  # type: ignore[union-attr]
    assert system.http.post("/api/events", content=b"x" * (2 << 20)).status_code == 413  # type: ignore[union-attr]
    assert system.http.post("/api/events", json=[]).status_code == 400  # type: ignore[union-attr]
    time.sleep(0.3)
    assert system.get("/api/profile", uxid).json()["movies"] == []  # nothing of the bad batch counted


def test_contract_documents_and_metrics(system: RunningSystem) -> None:
    spec = system.get("/openapi.json").json()
    assert spec["openapi"].startswith("3.") and "/api/recommendations/movies" in spec["paths"]
    assert "mabrec API" in system.get("/docs").text
    assert system.get("/healthz").json() == {"status": "ok"}
    ready = system.get("/readyz").json()
    assert ready["ready"] and all(ready["shards"].values())
    metrics = system.get("/metrics").text
    assert 'mabrec_http_requests_total{method="GET",route="/api/movies/{id}",status="200"}' in metrics
    assert "mabrec_shard_users" in metrics and "mabrec_recommendations_total" in metrics


def test_status_command_finds_the_running_system(system: RunningSystem) -> None:
    env = {**system.env}
    out = subprocess.run([MABREC, "status"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "READY" in out.stdout and "shard" in out.stdout
    as_json = subprocess.run([MABREC, "status", "--json"], env=env, capture_output=True, text=True, timeout=60)
    status = orjson.loads(as_json.stdout)
    assert status["ready"]["ready"] and len(status["shards"]) == 2


def test_catalog_load_while_running_is_picked_up_and_keeps_learned_state(system: RunningSystem) -> None:
    uxid = f"reload-{secrets.token_hex(4)}"
    system.get("/api/movies/2", uxid)
    wait_for_profile(system, uxid, 1)
    out = subprocess.run(
        [MABREC, "catalog", "load", str(SMALL_JSONL), "--merge"],
        env=system.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "loaded 3 movies" in out.stdout
    deadline = time.monotonic() + 10
    while system.get("/api/movies/100001").status_code != 200:
        assert time.monotonic() < deadline, "the running system did not pick up the new catalog"
        time.sleep(0.2)
    heat = system.get("/api/movies/100001").json()
    assert {a["name"] for a in heat["actors"]} == {"Al Pacino", "Robert De Niro"}, heat
    assert [d["name"] for d in heat["directors"]] == ["Michael Mann"]
    assert [k["name"] for k in heat["keywords"]] == ["heist", "los angeles"]
    assert system.get("/api/movies", params={"per_page": 1}).headers["x-total-count"] == "9637"
    profile = system.get("/api/profile", uxid).json()
    assert [(m["id"], m["alpha"]) for m in profile["movies"]] == [(2, 2)]


def test_stop_and_start_again_keeps_the_users_taste_even_with_more_shards(
    services: dict[str, str], tmp_path: Path
) -> None:
    database = make_database(services["database"])
    env = {"DATABASE_URL": database, "NATS_URL": services["nats"], "MABREC_NAMESPACE": f"rs{secrets.token_hex(4)}"}
    uxid = "returning-crime-fan"
    first = RunningSystem(tmp_path / "state", env).start()
    try:
        for movie in CRIME[300:320]:
            first.get(f"/api/movies/{movie}", uxid)
        before = wait_for_profile(first, uxid, 20)
        assert before["clicks"] == 20
    finally:
        assert first.stop() == 0, first.tail()
    second = RunningSystem(tmp_path / "state", env | {"MABREC_SHARDS": "3"}).start()  # re-sharded on start
    try:
        assert len(second.get("/readyz").json()["shards"]) == 3
        after = second.get("/api/profile", uxid).json()
        assert after == before
        shares = [crime_share(second.get("/api/recommendations/movies", uxid).json()) for _ in range(5)]
        assert np.mean(shares) >= 0.6, shares
    finally:
        assert second.stop() == 0, second.tail()
        drop_database(services["database"], database)


def test_embedded_servers_when_no_urls_are_configured(tmp_path: Path) -> None:
    """What `make run` does on a fresh machine: PostgreSQL, NATS and Ray all embedded."""
    env = {k: "" for k in ("DATABASE_URL", "NATS_URL", "RAY_ADDRESS")} | {"MABREC_NAMESPACE": "mabrec"}
    system = RunningSystem(tmp_path / "state", env).start()
    try:
        runtime = Runtime.load(tmp_path / "state")
        assert runtime is not None
        assert {s.name for s in runtime.services} == {"postgres", "nats", "ray"}
        assert all("127.0.0.1:" in s.url for s in runtime.services)
        assert len(system.get("/api/recommendations/movies", "laptop-user").json()) == 10
        pids = [s.pid for s in runtime.services]
        ray_tmp = ray_tmpdir(tmp_path / "state")
        assert ray_tmp.is_dir()
    finally:
        code = system.stop()
    assert code == 0, system.tail()
    assert not any(pid_alive(pid) for pid in pids), "an embedded server outlived mabrec up"
    assert not (tmp_path / "state" / "runtime.json").exists()
    assert not ray_tmp.exists(), "the local Ray's temp dir outlived it"


def test_verify_proves_state_and_catches_a_corrupted_checkpoint(system: RunningSystem) -> None:
    uxid = f"verify-{secrets.token_hex(4)}"
    for movie in (2, 4, 15):
        system.get(f"/api/movies/{movie}", uxid)
    system.get("/api/recommendations/movies", uxid)
    wait_for_profile(system, uxid, 3)
    out = subprocess.run([MABREC, "verify"], env=system.env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and " 0 mismatches" in out.stdout, out.stdout + out.stderr
    users = int(out.stdout.split("live state:")[1].split("users")[0])
    assert users >= 1

    assert system.runtime is not None
    time.sleep(1.0)  # let the user's last checkpoint land, then tamper with it
    with psycopg.connect(system.runtime.database_url, autocommit=True) as conn:
        row = conn.execute("SELECT counts FROM user_state WHERE uxid = %s", (uxid,)).fetchone()
        assert row is not None
        counts = bytearray(row[0])
        counts[4] += 1  # one more click on the user's first entity
        conn.execute("UPDATE user_state SET counts = %s WHERE uxid = %s", (bytes(counts), uxid))
    out = subprocess.run([MABREC, "verify", "--json"], env=system.env, capture_output=True, text=True, timeout=120)
    report = orjson.loads(out.stdout)
    assert out.returncode == 1 and not report["ok"]
    assert report["live"]["mismatches"] == 0 and report["checkpoints"]["mismatches"] == 1
    assert report["checkpoints"]["examples"][0].startswith(uxid)


def test_bench_commands_run_against_the_system(system: RunningSystem) -> None:
    env = system.env
    http = subprocess.run(
        [MABREC, "bench", "http", "--duration", "1.5", "--warmup", "0.5", "--clients", "8", "--mix", "recommend=8,open=1,list=1"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert http.returncode == 0, http.stdout + http.stderr
    rows = {line.split()[0]: line.split() for line in http.stdout.splitlines()[1:]}
    assert set(rows) == {"recommend", "open_movie", "list_page"} and all(r[2] == "0" for r in rows.values())
    opened = subprocess.run(
        [MABREC, "bench", "http", "--duration", "1.5", "--warmup", "0.5", "--rate", "200"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert opened.returncode == 0 and "recommend" in opened.stdout
    ingest = subprocess.run(
        [MABREC, "bench", "ingest", "--rate", "2000", "--duration", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    report = orjson.loads(ingest.stdout)
    assert report["events"] == 2000 and report["applied"] >= 2000 and report["publish_to_applied_ms"]["p99"] < 5000
    click = subprocess.run(
        [MABREC, "bench", "click", "--probes", "5", "--rate", "100"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert orjson.loads(click.stdout)["click_to_state_ms"]["p99"] < 5000
