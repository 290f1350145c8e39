"""The HTTP API in-process (Starlette's TestClient) on a backend of real parts without services
(tests/fakes.py): the contract, the events each request records, and every bad input's 4xx."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from starlette.testclient import TestClient

from api.app import create_app
from system.core.catalog import Catalog
from system.core.catalog_file import SHIPPED, read_movies
from system.core.events import CLICKED, SEEN, parse_event
from tests.fakes import FakeBackend


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return Catalog.from_movies(list(read_movies(SHIPPED)))


@pytest.fixture
def backend(catalog: Catalog) -> FakeBackend:
    return FakeBackend(catalog)


TOKEN = "s3cret-admin-token-of-some-length"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def client(backend: FakeBackend) -> Iterator[TestClient]:
    with TestClient(create_app(backend, admin_token=TOKEN)) as client:
        yield client


def test_the_list_paginates_by_id_without_overlap(client: TestClient, catalog: Catalog) -> None:
    pages = [client.get("/api/movies", params={"page": p, "per_page": 50}) for p in (1, 2, 3)]
    assert all(r.status_code == 200 for r in pages)
    assert pages[0].headers["x-total-count"] == str(len(catalog))
    flat = [m["id"] for r in pages for m in r.json()]
    assert flat == catalog.movie_ids[:150].tolist()
    last_page = -(-len(catalog) // 50)
    last = client.get("/api/movies", params={"page": last_page, "per_page": 50}).json()
    assert [m["id"] for m in last] == catalog.movie_ids[(last_page - 1) * 50 :].tolist()
    assert client.get("/api/movies", params={"page": last_page + 1, "per_page": 50}).json() == []


def test_a_movie_in_the_original_shape_with_its_genres(client: TestClient, backend: FakeBackend) -> None:
    movie = client.get("/api/movies/2").json()
    assert (movie["name"], movie["rating"], movie["duration"]) == ("The Godfather", 9.2, 175)
    assert {g["name"] for g in movie["genres"]} == {"Crime", "Drama"}
    assert set(movie) >= {"id", "name", "description", "rating", "votes", "duration", "duration_unit", "link"}
    assert movie["directors"] == [] and movie["actors"] == []
    assert client.get("/api/movies", params={"per_page": 2}).json()[1] == movie
    assert backend.published == []  # no uxid: nobody clicked


def test_opening_a_movie_with_a_uxid_records_an_attributed_click(client: TestClient, backend: FakeBackend) -> None:
    response = client.get("/api/movies/2", headers={"uxid": "alice", "X-Recommendation-Id": "rec-7"})
    assert response.status_code == 200
    [event] = backend.published
    assert (event.user, event.kind, event.movies, event.recommendation_id) == ("alice", CLICKED, (2,), "rec-7")
    profile = client.get("/api/profile", headers={"uxid": "alice", **ADMIN}).json()
    assert profile["clicks"] == 1 and [(m["id"], m["alpha"], m["beta"]) for m in profile["movies"]] == [(2, 2, 1)]
    crime = next(f for f in profile["facets"] if f["name"] == "Crime")
    assert (crime["kind"], crime["alpha"], crime["beta"]) == ("genres", 2, 1)


def test_a_new_user_gets_a_full_slate_and_its_impression_is_recorded(client: TestClient, backend: FakeBackend) -> None:
    response = client.get("/api/recommendations/movies", headers={"uxid": "newcomer"})
    assert response.status_code == 200 and response.headers["x-mabrec-source"] == "personal"
    slate = response.json()
    ids = [m["id"] for m in slate]
    assert len(ids) == 10 and len(set(ids)) == 10 and all(m["genres"] for m in slate)
    assert {m["reason"] for m in slate} <= {"popular", "something new"}  # nothing liked yet
    [impression] = backend.published
    assert (impression.user, impression.kind, list(impression.movies)) == ("newcomer", SEEN, ids)
    assert impression.recommendation_id == response.headers["x-recommendation-id"]
    assert len(client.get("/api/recommendations/movies", headers={"uxid": "n2"}, params={"limit": 25}).json()) == 25


def test_a_restarting_shard_means_a_popularity_slate_not_an_error(client: TestClient, backend: FakeBackend) -> None:
    backend.shard_down = True
    response = client.get("/api/recommendations/movies", headers={"uxid": "bob"})
    assert response.status_code == 200 and response.headers["x-mabrec-source"] == "popularity-fallback"
    assert len(response.json()) == 10 and {m["reason"] for m in response.json()} == {"popular"}
    assert client.get("/readyz").status_code == 503


def test_posted_events_are_applied_and_a_retry_counts_once(client: TestClient, backend: FakeBackend) -> None:
    batch = [
        {"event_type": "seen", "entity_ids": [1, 2, 3], "user_id": "carol", "event_id": "imp-1"},
        {"event_type": "clicked", "entity_id": 2, "user_id": "carol", "event_id": "clk-1"},
    ]
    first = client.post("/api/events", json=batch)
    assert first.status_code == 202 and first.json() == {
        "accepted": 2,
        "event_ids": ["imp-1", "clk-1"],
        "stream_seq": 2,
    }
    assert client.post("/api/events", json=batch).status_code == 202  # a client's retry
    profile = client.get("/api/profile", headers={"uxid": "carol", **ADMIN}).json()
    assert {m["id"]: (m["alpha"], m["beta"]) for m in profile["movies"]} == {1: (1, 2), 2: (2, 2), 3: (1, 2)}
    # An event without an id gets one, so it can be told apart from the others.
    single = client.post("/api/events", json={"event_type": "clicked", "entity_id": 5, "user_id": "carol"}).json()
    assert single["accepted"] == 1 and single["event_ids"][0]


def test_a_batch_with_a_bad_event_is_refused_whole(client: TestClient, backend: FakeBackend) -> None:
    good = {"event_type": "clicked", "entity_id": 5, "user_id": "dave"}
    response = client.post("/api/events", json=[good, {"event_type": "seen", "user_id": "dave"}])
    assert response.status_code == 400 and response.json()["errors"] == [
        {"index": 1, "error": "invalid", "detail": "entity_id (or entity_ids) is required"}
    ]
    assert client.post("/api/events", content=b"[{").status_code == 400
    assert client.post("/api/events", json=[]).status_code == 400
    assert client.post("/api/events", content=b"x" * (2 << 20)).status_code == 413
    # An unknown movie refuses the batch, as the stream would: nothing of it is half applied.
    seen = {"event_type": "seen", "user_id": "dave"}
    response = client.post("/api/events", json=[good, {**seen, "entity_ids": [1, 2, 99999999]}])
    assert response.status_code == 400 and response.json()["errors"] == [
        {"index": 1, "error": "unknown_movie", "detail": "no movie 99999999 in the catalog"}
    ]
    for bad in (
        {"entity_ids": [1, 1, 1, 1]},  # once four impressions
        {"entity_id": 2, "entity_ids": [3]},
        {"entity_id": 2, "ts": 1e308},
        {"entity_id": 2, "ts": "9999-01-01T00:00:00Z"},
        {"entity_id": 2, "ts": -5},
    ):
        response = client.post("/api/events", json=[good, {**seen, **bad}])
        assert response.status_code == 400 and response.json()["errors"][0]["index"] == 1, bad
    assert backend.published == [] and "dave" not in backend.state.users


def test_a_user_id_is_utf8_text_in_the_header_as_in_events(client: TestClient, backend: FakeBackend) -> None:
    for uxid in ("café", "🎬 fan"):
        event = {"event_type": "clicked", "entity_id": 5, "user_id": uxid}
        assert client.post("/api/events", json=event).status_code == 202
        header = {b"uxid": uxid.encode()}  # what any client sends: the UTF-8 bytes
        assert client.get("/api/recommendations/movies", headers=header).status_code == 200
        profile = client.get("/api/profile", headers={**header, b"authorization": f"Bearer {TOKEN}".encode()}).json()
        assert profile["uxid"] == uxid and profile["clicks"] == 1  # one user, whichever way they came
    assert set(backend.state.users) >= {"café", "🎬 fan"} and "cafÃ©" not in backend.state.users
    # (The raw bytes of a header, Latin-1 ones too, are tested on a real server: tests/test_http.py.)


def test_events_refused_while_nats_is_away_ask_for_a_retry(client: TestClient, backend: FakeBackend) -> None:
    backend.nats_down = True
    response = client.post("/api/events", json={"event_type": "clicked", "entity_id": 5, "user_id": "erin"})
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert response.json()["error"] == "unavailable"
    # A slate is still served; its impression is dropped and counted.
    assert client.get("/api/recommendations/movies", headers={"uxid": "erin"}).status_code == 200
    assert 'mabrec_events_dropped_total{type="seen"} 1.0' in client.get("/metrics").text


@pytest.mark.parametrize(
    ("method", "path", "uxid", "params", "status", "says"),
    [
        ("GET", "/api/recommendations/movies", None, {}, 400, "uxid header is required"),
        ("GET", "/api/recommendations/movies", "x" * 129, {}, 400, "uxid header must be"),
        ("GET", "/api/recommendations/movies", "tab\there", {}, 400, "uxid header must be"),
        ("GET", "/api/recommendations/movies", "u", {"limit": ""}, 400, "limit must be"),
        ("GET", "/api/recommendations/movies", "u", {"limit": "0"}, 400, "limit must be"),
        ("GET", "/api/recommendations/movies", "u", {"limit": "many"}, 400, "limit must be"),
        ("GET", "/api/recommendations/movies", "u", {"limit": "101"}, 400, "limit must be"),
        ("GET", "/api/recommendations/movies", "u", {"limit": "1_0"}, 400, "limit must be"),
        ("GET", "/api/movies", None, {"per_page": "0"}, 400, "per_page must be"),
        ("GET", "/api/movies", None, {"per_page": "101"}, 400, "per_page must be"),
        ("GET", "/api/movies", None, {"page": "-1"}, 400, "page must be"),
        ("GET", "/api/movies", None, {"per_page": ""}, 400, "per_page must be"),
        ("GET", "/api/movies/abc", None, {}, 400, "plain digits"),
        ("GET", "/api/movies/1.5", None, {}, 400, "plain digits"),
        ("GET", "/api/movies/1_0", "u", {}, 400, "plain digits"),  # once movie 10, and a click
        ("GET", "/api/movies/+2", "u", {}, 400, "plain digits"),
        ("GET", "/api/movies/0002", "u", {}, 400, "plain digits"),
        ("GET", "/api/movies/%202", "u", {}, 400, "plain digits"),
        ("GET", "/api/movies/%D9%A2", "u", {}, 400, "plain digits"),  # an Arabic-Indic 2
        ("GET", "/api/movies/99999999", None, {}, 404, "no movie with id"),
        ("GET", "/api/movies/2", "", {}, 400, "uxid header must be"),
        ("GET", "/api/profile", None, {}, 401, "Authorization: Bearer"),
        ("GET", "/api/nothing-here", None, {}, 404, "Not Found"),
        ("DELETE", "/api/movies/2", None, {}, 405, "Method Not Allowed"),
    ],
)
def test_bad_input_gets_a_clear_4xx_json_error(
    client: TestClient,
    backend: FakeBackend,
    method: str,
    path: str,
    uxid: str | None,
    params: dict[str, str],
    status: int,
    says: str,
) -> None:
    headers = {"uxid": uxid} if uxid is not None else {}
    response = client.request(method, path, headers=headers, params=params)
    assert response.status_code == status
    body = response.json()
    assert set(body) >= {"error", "detail"} and says in body["detail"]
    assert backend.published == []  # nothing recorded for a refused request


def test_the_contract_the_docs_and_the_metrics(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert spec["openapi"].startswith("3.") and "/api/recommendations/movies" in spec["paths"]
    docs = client.get("/docs").text
    assert "mabrec API" in docs and "SwaggerUIBundle" in docs and "/openapi.json" in docs
    # Offline: every asset the page loads is served here, by the API, from the package.
    assets = re.findall(r"(?:src|href)='([^']+)'", docs)
    assert assets and not [a for a in assets if "//" in a]
    for asset in assets:
        got = client.get(asset)
        assert got.status_code == 200 and len(got.content) > 0, asset
    assert "javascript" in client.get("/docs/assets/swagger-ui-bundle.js").headers["content-type"]
    assert client.get("/docs/assets/nothing.js").status_code == 404
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["ready"]
    client.get("/api/movies/2")
    metrics = client.get("/metrics").text
    assert 'mabrec_http_requests_total{method="GET",route="/api/movies/{id}",status="200"} 1.0' in metrics
    assert 'mabrec_shard_users{shard="0"}' in metrics


def test_an_idempotency_key_makes_a_retry_without_event_ids_count_once(
    client: TestClient, backend: FakeBackend
) -> None:
    batch = [
        {"event_type": "clicked", "entity_id": 5, "user_id": "gus"},
        {"event_type": "clicked", "entity_id": 5, "user_id": "gus"},  # the same click twice: two clicks
    ]
    first = client.post("/api/events", json=batch, headers={"Idempotency-Key": "order-42"}).json()
    again = client.post("/api/events", json=batch, headers={"Idempotency-Key": "order-42"}).json()
    assert first["event_ids"] == again["event_ids"] and len(set(first["event_ids"])) == 2
    other = client.post("/api/events", json=batch[:1], headers={"Idempotency-Key": "order-43"}).json()
    unkeyed = client.post("/api/events", json=batch[:1]).json()  # no key: a retry would count again
    assert not set(other["event_ids"] + unkeyed["event_ids"]) & set(first["event_ids"])
    assert client.get("/api/profile", headers={"uxid": "gus", **ADMIN}).json()["clicks"] == 4  # 2, then 1 and 1
    assert client.post("/api/events", json=batch, headers={"Idempotency-Key": ""}).status_code == 400


def test_admin_routes_are_off_without_a_token_and_refuse_a_wrong_one(catalog: Catalog) -> None:
    backend = FakeBackend(catalog)
    with TestClient(create_app(backend)) as off:
        response = off.post("/api/admin/scale", json={"shards": 3}, headers={"Authorization": "Bearer anything"})
        assert response.status_code == 403 and "MABREC_ADMIN_TOKEN" in response.json()["detail"]
    token = TOKEN
    with TestClient(create_app(backend, admin_token=token)) as on:
        assert on.post("/api/admin/scale", json={"shards": 3}).status_code == 401
        wrong = on.post("/api/admin/scale", json={"shards": 3}, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"].startswith("Bearer")
        assert backend.desired_shards is None
        bad = on.post("/api/admin/scale", json={"shards": 0}, headers={"Authorization": f"Bearer {token}"})
        assert bad.status_code == 400
        ok = on.post("/api/admin/scale", json={"shards": 3}, headers={"Authorization": f"Bearer {token}"})
        assert ok.status_code == 202 and backend.desired_shards == 3


ADMIN_ROUTES = [
    ("GET", "/api/profile"),
    ("GET", "/api/users/alice"),
    ("DELETE", "/api/users/alice"),
    ("GET", "/api/status"),
    ("GET", "/api/admin/erasures"),
    ("POST", "/api/admin/scale"),
]


@pytest.mark.parametrize(("method", "path"), ADMIN_ROUTES)
def test_every_admin_route_refuses_a_missing_or_wrong_token(catalog: Catalog, method: str, path: str) -> None:
    backend = FakeBackend(catalog)
    backend.state.apply([parse_event({"event_type": "clicked", "entity_id": 2, "user_id": "alice"})])
    with TestClient(create_app(backend)) as off:
        refused = off.request(method, path, headers={"uxid": "alice", **ADMIN}, json={"shards": 2})
        assert refused.status_code == 403 and "MABREC_ADMIN_TOKEN" in refused.json()["detail"]
    with TestClient(create_app(backend, admin_token=TOKEN)) as on:
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {TOKEN}"}):
            answer = on.request(method, path, headers={"uxid": "alice", **headers}, json={"shards": 2})
            assert answer.status_code == 401 and answer.json()["error"] == "unauthorized", headers
            assert "uxid" not in answer.text and "alpha" not in answer.text  # nothing of the user leaks
    assert [2, 1, 0] in [row[:3] for row in backend.state.counts_of("alice").tolist()] and not backend.erased
    assert backend.desired_shards is None


def test_the_admin_profile_shows_top_facets_and_why_the_last_slate(client: TestClient, catalog: Catalog) -> None:
    movie = catalog.movies[0]
    for _ in range(3):
        assert client.get(f"/api/movies/{movie.id}", headers={"uxid": "hana"}).status_code == 200
    slate = client.get("/api/recommendations/movies", headers={"uxid": "hana"}, params={"limit": 5}).json()
    profile = client.get("/api/users/hana", headers=ADMIN).json()
    assert profile["uxid"] == "hana" and profile["clicks"] == 3
    liked = {(catalog.facets[j].kind, catalog.facets[j].name) for j in catalog.facets_of(0)}
    top = profile["top_facets"]
    assert {(f["kind"], f["name"]) for f in top} == liked  # only what the user clicked
    assert all(f["mean"] == round(f["alpha"] / (f["alpha"] + f["beta"]), 4) and f["clicks"] == 3 for f in top)
    assert [f["cautious_lift"] for f in top] == sorted((f["cautious_lift"] for f in top), reverse=True)
    assert all(f["lift"] > f["cautious_lift"] for f in top) and "cautious" in profile["measure"]
    last = profile["last_slate"]
    assert [(m["id"], m["reason"]) for m in last["movies"]] == [(m["id"], m["reason"]) for m in slate]
    assert client.get("/api/profile", headers={"uxid": "hana", **ADMIN}).json() == profile  # the header form


def test_a_user_who_keeps_clicking_crime_sees_crime_first_in_their_profile(
    client: TestClient, catalog: Catalog
) -> None:
    """Issue 21: after 3 Crime clicks the profile ranked Animation (0 clicks, 1 impression) above
    Crime, and the more slates of Crime a user clicked through the lower Crime's mean fell. A
    scripted user takes a Crime (or Crime drama) movie from each slate, from the catalog when the
    slate has none: from their third click on, Crime leads, and every reason names a genre they
    clicked. (A user whose Crime clicks are mostly mysteries likes Mystery more, as far as any
    evidence can tell: a rarer genre clicked as often.)"""
    crime = sorted(m.id for m in catalog.movies if "Crime" in set(m.facets.get("genres", [])) <= {"Crime", "Drama"})
    genres = {m.id: set(m.facets.get("genres", [])) for m in catalog.movies}
    clicked: list[int] = []
    for _ in range(12):
        slate = client.get("/api/recommendations/movies", headers={"uxid": "crime-fan"}, params={"limit": 10}).json()
        liked = set().union(*(genres[m] for m in clicked))
        assert {m["reason"][len("you like ") :] for m in slate if m["reason"].startswith("you like")} <= liked
        pick = next((m["id"] for m in slate if m["id"] in crime and m["id"] not in clicked), None)
        pick = pick or next(m for m in crime if m not in clicked)
        assert client.get(f"/api/movies/{pick}", headers={"uxid": "crime-fan"}).status_code == 200
        clicked.append(pick)
        if len(clicked) >= 3:
            top = client.get("/api/users/crime-fan", headers=ADMIN).json()["top_facets"]
            assert top[0]["name"] == "Crime" and top[0]["clicks"] == len(clicked), (len(clicked), top[:3])


def test_erasing_a_user_forgets_them_and_their_id_starts_anew(client: TestClient, backend: FakeBackend) -> None:
    assert client.get("/api/movies/2", headers={"uxid": "ivan"}).status_code == 200
    assert client.get("/api/users/ivan", headers=ADMIN).json()["clicks"] == 1
    erased = client.delete("/api/users/ivan", headers=ADMIN)
    assert erased.status_code == 202 and erased.json()["in_memory"] is True
    assert "ivan" not in backend.state.users and "ivan" not in backend.last_slates
    assert client.get("/api/users/ivan", headers=ADMIN).json()["movies"] == []  # a new user
    assert client.get("/api/admin/erasures", headers=ADMIN).json()["erasures"][0]["erasure"] == erased.json()["erasure"]
    bad = client.delete("/api/users/a%07b", headers=ADMIN)
    assert bad.status_code == 400 and "user id in the path" in bad.json()["detail"]
