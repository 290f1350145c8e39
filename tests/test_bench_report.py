"""`mabrec bench report` (what `make bench` runs) end to end, in its quick mode: it starts its own
system with embedded servers, runs every benchmark, and writes the report."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
from pathlib import Path

import psutil
import pytest

from bench.running import MABREC, wait_until
from system.local.processes import pid_alive, stop_pid
from system.local.runtime import Runtime

pytestmark = [pytest.mark.e2e, pytest.mark.integration]


@pytest.mark.timeout(600)  # it runs every benchmark, briefly, on three systems in turn
def test_report_writes_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "BENCHMARKS.md"
    done = subprocess.run(
        [MABREC, "bench", "report", "--quick", "--no-dashboard", "--output", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    text = out.read_text()
    for row in (
        "CPU per slate, all processes, at 1,000 slates/s, new users",
        "state rows | ≤ 0.5 ms |",
        "closed loop, Python load generator, 64 connections",
        "1,000 slates/s and a click per 10 slates (open loop), 1 run |",
        "ingestion at 20,000 events/s",
        "a click in the user's state",
        "memory, 20,000 users",
        "`mabrec up` to ready",
        "20,000 distinct users, each touched once",
        "a slate for a user not in memory",
        "after 20,000 events in the log",
        "policy, one slate in-process, by the user's state rows",
        "| always |",  # JetStream's disk sync, by setting
        "| CPU per slate at 1,000 slates/s, new users (ms) |",  # the floor beside the system
        "| process | wakeups per slate | NATS messages sent / received per slate |",
    ):
        assert row in text
    report = json.loads(out.with_suffix(".json").read_text())
    for users in ("new", "history"):  # every process of the system was measured, and adds up
        run = report["cpu"][users]
        assert run["slates"] > 0 and all(run["by_process_ms"][p] > 0 for p in ("shards", "api", "router", "nats"))
        assert abs(sum(run["by_process_ms"].values()) - run["cpu_ms_per_slate"]) < 0.01
    floor = report["floor"]  # measured, and the system's ratio to it written
    assert floor["paced"]["cpu_ms_per_slate"] > 0 and floor["closed_loop"]["rate_per_s"] > 0
    ratio = report["cpu"]["new"]["cpu_ms_per_slate"] / floor["paced"]["cpu_ms_per_slate"]
    assert f"| {ratio:.2f}x | ≤ 1.5x |" in text
    woken, messages = report["cpu"]["new"]["wakeups_per_slate"], report["cpu"]["new"]["nats_messages_per_slate"]
    assert woken["shards"] > 0 and woken["api"] > 0 and messages["in"] > 0 and messages["out"] > 0
    sent = messages["by_process"]
    assert sent["api"]["sent"] > 0 and sent["shards"]["received"] > 0 and sent["router"]["sent"] > 0
    assert report["policy"]["openblas_unset"]["cold_us_per_slate"] > 0 and "kernel" in report["policy"]["blas"]
    assert report["policy"]["rows9000_rows"] > 5_000 and report["policy"]["rows9000_us_per_slate"] > 0
    growth = report["growth"]
    assert growth["memory_after"]["users_in_postgres"] >= 20_000
    assert growth["slate_evicted"]["users_loaded"] > 0  # they were not in memory
    assert growth["slate_evicted"]["errors"] == 0 and growth["slate_resident"]["errors"] == 0
    restart = report["restart"]
    assert restart["routed_after_restart"] < restart["events"] / 100  # the gap, not the history
    assert " 0 errors" in text and "nan" not in text


@pytest.mark.timeout(180)
def test_a_stopped_report_stops_the_system_it_started(tmp_path: Path) -> None:
    """SIGTERM to `mabrec bench report` (a CI job cancelled, a `kill`) stops the `mabrec up` it
    started, with its embedded servers, and removes its state directory."""
    report = subprocess.Popen(
        [MABREC, "bench", "report", "--quick", "--no-dashboard", "--output", str(tmp_path / "B.md")],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip

    def state_dirs() -> set[Path]:  # of the `mabrec up` the report started (its only such child)
        dirs = set()
        for child in psutil.Process(report.pid).children():
            with contextlib.suppress(psutil.Error):
                if state_dir := child.environ().get("MABREC_STATE_DIR"):
                    dirs.add(Path(state_dir))
        return dirs

    def started() -> Runtime | None:  # its runtime, once it is up
        return next((r for d in state_dirs() if (r := Runtime.load(d)) is not None), None)

    pids: list[int] = []
    try:
        wait_until(started, 120, "the report's system started")
        runtime = started()
        assert runtime is not None
        pids = [runtime.supervisor_pid, *(s.pid for s in runtime.services)]
        dirs = state_dirs()
        report.send_signal(signal.SIGTERM)
        assert report.wait(timeout=120) == 128 + signal.SIGTERM
        left = [pid for pid in pids if pid_alive(pid)]
    finally:
        if report.poll() is None:
            report.kill()
        for pid in pids:  # whatever the outcome, nothing of it stays running
            if pid_alive(pid):
                stop_pid(pid, signal.SIGTERM)
    assert not left, "the report's system outlived it"
    assert dirs and not any(d.exists() for d in dirs), "its state directory was left behind"
