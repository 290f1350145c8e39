"""`mabrec bench report` (what `make bench` runs) end to end, in its quick mode: it starts its own
system with embedded servers, runs every benchmark, and writes the report."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from bench.running import MABREC

pytestmark = [pytest.mark.e2e, pytest.mark.integration]


def test_report_writes_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "BENCHMARKS.md"
    done = subprocess.run(
        [MABREC, "bench", "report", "--quick", "--no-dashboard", "--output", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    text = out.read_text()
    for row in (
        "closed loop, 64 connections",
        "open loop at 1,000 req/s",
        "ingestion at 20,000 events/s",
        "a click in the user's state",
        "memory, 100,000 users",
        "`mabrec up` to ready",
    ):
        assert row in text
    assert " 0 errors" in text and "nan" not in text
