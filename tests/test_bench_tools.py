"""The load-test and benchmark tooling, without a system: its arithmetic, its parsing, and how
the report is written (tests/test_e2e.py and tests/test_bench_report.py run the tools against a
real one)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench import report, wrk
from bench.loadtest import Histogram, Mix, Session, percentiles_from_buckets
from system.bus import dataplane
from system.core.events import CLICKED, Event


def test_histogram_percentiles_are_read_from_all_samples() -> None:
    h = Histogram()
    for ms in range(1, 101):  # 1..100 ms
        h.add(ms / 1000)
    assert h.percentile(50) == pytest.approx(0.050, rel=0.05)
    assert h.percentile(99) == pytest.approx(0.099, rel=0.05)
    assert np.isnan(Histogram().percentile(50))


def test_bucket_percentiles() -> None:
    edges = [0.001, 0.01, 0.1, float("inf")]
    assert percentiles_from_buckets(edges, [0, 90, 9, 1], (50, 99)) == {"p50": 0.01, "p99": 0.1}


def test_mix_parsing_and_session_choices() -> None:
    mix = Mix.parse("recommend=8,open=1,list=1")
    assert (mix.recommend, mix.open_movie, mix.list_page) == (8, 1, 1)
    with pytest.raises(ValueError):
        Mix.parse("buy=1")
    session = Session(mix, users=1000, zipf=1.1, limit=10, movie_ids=[1, 2, 3], seed=0)
    kinds = [session.next()[0] for _ in range(2000)]
    assert 0.75 < kinds.count("recommend") / 2000 < 0.85
    session.saw("bench-0", b'[{"id": 7}, {"id": 9}]', "rec-1")
    while True:
        kind, path, headers, user = session.next()
        if kind == "open_movie" and user == "bench-0":
            break
    assert path in ("/api/movies/7", "/api/movies/9") and headers["X-Recommendation-Id"] == "rec-1"


def test_wire_round_trips() -> None:
    events = [(17, 1_800_000_000, Event("u1", CLICKED, (4, 5), "e-1", None, 12.5))]
    assert dataplane.decode_apply(dataplane.encode_apply(10, 20, events)) == (10, 20, events)
    assert dataplane.decode_call(dataplane.encode_call(dataplane.SLATES, [["u", 10]])) == (
        dataplane.SLATES,
        [["u", 10]],
    )
    assert dataplane.decode_reply(dataplane.encode_reply([[1, 2]])) == [[1, 2]]
    with pytest.raises(ValueError, match="boom"):
        dataplane.decode_reply(dataplane.encode_reply(error="boom"))


def test_a_large_span_is_cut_between_messages_small_enough_to_send() -> None:
    events = [
        (seq, 0, Event(f"user-{seq}-{i}", CLICKED, tuple(range(1, 40)))) for seq in range(11, 31) for i in range(50)
    ]
    spans = dataplane.split_span(10, 40, events, max_bytes=20_000)
    assert len(spans) > 1 and spans[0][0] == 10 and spans[-1][1] == 40
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))  # consecutive
    assert [e for _, _, chunk in spans for e in chunk] == events  # nothing lost or doubled
    for start, upto, chunk in spans:  # whole messages only: each event within its span
        assert all(start < seq <= upto for seq, _, _ in chunk)
        assert len(dataplane.encode_apply(start, upto, chunk)) < 2 * 20_000
    assert dataplane.split_span(10, 40, []) == [(10, 40, [])]  # a heartbeat stays one span


def test_wrk_output_is_read_with_its_units_and_errors() -> None:
    out = """Running 2s test @ http://127.0.0.1:1/api/recommendations/movies
  2 threads and 64 connections
  Latency Distribution
     50%  850.00us
     75%   30.00ms
     90%   40.10ms
     99%    1.20s
  4000 requests in 2.00s, 4.00MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 3
Requests/sec:   2000.50
"""
    assert wrk.parse(out) == {
        "requests": 4000, "rate_per_s": 2000, "errors": 6,
        "p50_ms": 0.85, "p75_ms": 30.0, "p90_ms": 40.1, "p99_ms": 1200.0,
    }  # fmt: skip


def test_a_new_report_keeps_the_hand_kept_history_section(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "BENCHMARKS.md"
    monkeypatch.setattr(report, "markdown", lambda results: f"# Benchmarks\n\nrun {results['run']}\n")
    report.write({"run": 1}, path)
    history = f"{report.HISTORY}\n\n2026-12-07: something measured before and after.\n"
    path.write_text(path.read_text() + "\n" + history)
    report.write({"run": 2}, path)
    text = path.read_text()
    assert text.startswith("# Benchmarks\n\nrun 2\n") and "run 1" not in text
    assert text.endswith(history) and text.count(report.HISTORY) == 1


def test_the_floor_serves_the_systems_new_user_slate_and_keeps_no_one() -> None:
    """The floor is the system's own code for a new user's slate (the header and query rules,
    the draw, the rendering) and nothing else: it remembers no user it served."""
    from starlette.testclient import TestClient

    from bench import floor
    from system.core.catalog import Catalog
    from system.core.catalog_file import read_movies
    from tests.conftest import SMALL_CSV

    catalog = Catalog.from_movies(list(read_movies(SMALL_CSV)))
    app = floor.app(catalog)
    with TestClient(app) as client:
        slate = client.get("/api/recommendations/movies", headers={b"uxid": "café".encode()})
        assert slate.status_code == 200 and len(slate.json()) == 10
        assert {m["id"] for m in slate.json()} <= set(catalog.movie_ids.tolist()) and all(
            m["reason"] for m in slate.json()
        )
        assert len(client.get("/api/recommendations/movies", params={"limit": 3}, headers={"uxid": "u"}).json()) == 3
        refused = client.get("/api/recommendations/movies", params={"limit": "0"}, headers={"uxid": "u"})
        assert refused.status_code == 400 and "limit" in refused.json()["detail"]
        assert client.get("/api/recommendations/movies").status_code == 400  # no uxid
    assert len(app.state.shard.users) == 0
