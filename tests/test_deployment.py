"""The production shape, run as docker-compose.yml runs it, with the services' own commands and
environment as local processes (no Docker engine here): a Ray head with the supervisor and API
on it, and a second Ray node. Every process of the second node is killed mid-stream: the shards
it held restart on the head from their checkpoints and the stream, and nothing is lost."""

from __future__ import annotations

import os
import secrets
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
import pytest
import yaml

from bench.running import wait_until
from system.local.processes import free_port, stop_pid
from system.local.runtime import Runtime
from tests.conftest import RECOVERY, drop_database, make_database
from tests.load import Load, check_load, status, verify

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def compose_command(service: str) -> list[str]:
    command = COMPOSE["services"][service]["command"]
    return command if isinstance(command, list) else shlex.split(command)


def compose_env(service: str) -> dict[str, str]:
    return {k: str(v) for k, v in COMPOSE["services"][service]["environment"].items()}


def test_the_compose_file_is_the_shape_this_test_runs() -> None:
    """What the multi-node test below takes from the compose file, and what it must change to
    run on one machine (loopback addresses and free ports, the test's own services)."""
    head = compose_command("mabrec")
    assert head[:2] == ["sh", "-c"] and "ray start --head --port=6379" in head[2] and "exec mabrec up" in head[2]
    assert compose_command("ray-worker")[:3] == ["ray", "start", "--address=mabrec:6379"]
    # Every node exports its metrics on 8080, where Prometheus scrapes them (tests/test_observability.py).
    assert "--metrics-export-port=8080" in head[2] and "--metrics-export-port=8080" in compose_command("ray-worker")
    env = compose_env("mabrec")
    assert env["RAY_ADDRESS"] == "127.0.0.1:6379" and env["RAY_AUTH_MODE"] == "token" and env["MABREC_MIN_NODES"] == "2"
    assert {"DATABASE_URL", "NATS_URL", "MABREC_ADMIN_TOKEN", "RAY_AUTH_TOKEN"} <= set(env)
    assert {"NATS_API_URL", "NATS_SHARD_URL", "NATS_ROUTER_URL"} <= set(env)  # each role its own NATS user
    assert all(p.startswith("127.0.0.1:") for s in COMPOSE["services"].values() for p in s.get("ports", []))


class Cluster:
    """The compose services as local processes, each node's Ray in one private temp dir."""

    def __init__(self, services: dict[str, str], tmp: Path) -> None:
        self.tmp = tmp
        self.database = make_database(services["database"])
        self.services = services
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="mbr-", dir="/tmp"))  # short: Ray's socket paths
        self.port, self.api_port, self.dashboard = free_port(), free_port(), free_port()
        self.head_metrics, self.worker_metrics = free_port(), free_port()  # one machine: a port each
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("MABREC_", "RAY_"))},
            **compose_env("mabrec"),
            "RAY_AUTH_TOKEN": secrets.token_hex(32),
            "MABREC_ADMIN_TOKEN": secrets.token_hex(16),
            "DATABASE_URL": self.database,
            # The test's NATS for every role (the compose NATS's users and rights: tests/test_embedded.py).
            **{key: services["nats"] for key in ("NATS_URL", "NATS_API_URL", "NATS_SHARD_URL", "NATS_ROUTER_URL")},
            "RAY_ADDRESS": f"127.0.0.1:{self.port}",
            "MABREC_HOST": "127.0.0.1",
            "MABREC_PORT": str(self.api_port),
            "MABREC_NAMESPACE": f"cl{secrets.token_hex(4)}",
            "MABREC_STATE_DIR": str(tmp / "state"),
            "MABREC_CHECKPOINT_INTERVAL": "0.5",
            "RAY_TMPDIR": str(self.ray_tmp),
            "TMPDIR": str(self.ray_tmp),  # its processes' temp files (pymp-*) go with it
            # Where the head writes Ray's Grafana dashboards (a volume in the compose file).
            "RAY_METRICS_GRAFANA_DASHBOARD_OUTPUT_DIR": str(tmp / "ray-dashboards"),
            # Every process of this cluster inherits it: how stop() finds the ones Ray daemonized.
            "MABREC_TEST_CLUSTER": self.ray_tmp.name,
            "PATH": f"{BIN}:{os.environ['PATH']}",
        }
        self.head: subprocess.Popen[bytes] | None = None
        self.worker: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Both services at once, as `docker compose up` starts them; `mabrec up` waits for the
        second node (MABREC_MIN_NODES) before it places the shards."""
        script = compose_command("mabrec")[2]
        script = script.replace("--port=6379", f"--port={self.port} --node-ip-address=127.0.0.1")
        script = script.replace(
            "--dashboard-host=0.0.0.0", f"--dashboard-host=127.0.0.1 --dashboard-port={self.dashboard}"
        )
        script = script.replace("--metrics-export-port=8080", f"--metrics-export-port={self.head_metrics}")
        (self.tmp / "ray-dashboards").mkdir(exist_ok=True)
        with open(self.tmp / "head.log", "wb") as log:
            self.head = subprocess.Popen(["sh", "-c", script], env=self.env, stdout=log, stderr=subprocess.STDOUT)
        ours = {"mabrec:6379": f"127.0.0.1:{self.port}", "export-port=8080": f"export-port={self.worker_metrics}"}
        worker = compose_command("ray-worker")
        for theirs, mine in ours.items():
            worker = [a.replace(theirs, mine) for a in worker]
        worker.insert(2, "--node-ip-address=127.0.0.1")
        wait_until(lambda: (self.ray_tmp / "ray").exists() or self.head_died(), 60, "the head's Ray")
        with open(self.tmp / "worker.log", "wb") as log:
            self.worker = subprocess.Popen(worker, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        wait_until(lambda: Runtime.load(self.tmp / "state") is not None or self.head_died(), 180, "mabrec up ready")
        assert not self.head_died(), (self.tmp / "head.log").read_text()[-3000:]

    def head_died(self) -> bool:
        return self.head is not None and self.head.poll() is not None

    @property
    def running(self) -> Any:
        """What tests/load.py needs of a running system."""
        admin_headers = {"Authorization": f"Bearer {self.env['MABREC_ADMIN_TOKEN']}"}  # /api/status asks for it
        return SimpleNamespace(runtime=Runtime.load(self.tmp / "state"), env=self.env, admin_headers=admin_headers)

    def worker_processes(self) -> list[psutil.Process]:
        assert self.worker is not None
        parent = psutil.Process(self.worker.pid)
        return [parent, *parent.children(recursive=True)]

    def ours(self, proc: psutil.Process) -> bool:
        try:
            mark: str | None = proc.environ().get("MABREC_TEST_CLUSTER")
            return proc.pid != os.getpid() and mark == self.ray_tmp.name
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            return False

    def stop(self) -> None:
        if self.head is not None and self.head.poll() is None:
            self.head.send_signal(signal.SIGTERM)  # `mabrec up`, exec'd: final checkpoints
            self.head.wait(90)
        if self.worker is not None and self.worker.poll() is None:
            stop_pid(self.worker.pid, signal.SIGTERM, timeout=20)
        if self.worker is not None:
            self.worker.wait(5)  # reaped here, not warned about in a later test
        # The head's Ray daemonized (`ray start` without --block): its processes are the ones
        # that inherited this cluster's mark. Raylet first, gcs_server last.
        ours = [p for p in psutil.process_iter() if self.ours(p)]
        ours.sort(key=lambda p: 0 if "raylet" in p.name() else 2 if "gcs_server" in p.name() else 1)
        for proc in ours:
            try:
                stop_pid(proc.pid, signal.SIGTERM, timeout=20)
            except psutil.NoSuchProcess:
                pass
        drop_database(self.services["database"], self.database)
        subprocess.run(["rm", "-rf", str(self.ray_tmp)], check=False)


@pytest.fixture
def cluster(services: dict[str, str], tmp_path: Path) -> Iterator[Cluster]:
    running = Cluster(services, tmp_path)
    try:
        running.start()
        yield running
    finally:
        running.stop()


@pytest.mark.timeout(600)  # a cluster of two nodes to start, a node to lose, a recount
def test_losing_a_node_mid_stream_loses_nothing(cluster: Cluster) -> None:
    wait_until(lambda: all(s["ready"] for s in status(cluster.running)["shards"]), 60, "every shard ready")
    wait_until(lambda: len(psutil.Process(cluster.worker.pid).children(recursive=True)) > 2, 60, "the worker node up")  # type: ignore[union-attr]
    # Shards spread over both nodes; those of the second die with it.
    wait_until(
        lambda: {s["pid"] for s in status(cluster.running)["shards"]} & {p.pid for p in cluster.worker_processes()},
        60,
        "a shard on the second node",
    )
    with Load(cluster.running, "node") as load:
        load.under_way()
        doomed = {p.pid for p in cluster.worker_processes()}
        lost = [s["shard"] for s in status(cluster.running)["shards"] if s["pid"] in doomed]
        for proc in cluster.worker_processes():
            proc.kill()
        killed = time.monotonic()
        wait_until(
            lambda: all(s["ready"] and s["pid"] not in doomed for s in status(cluster.running)["shards"]),
            120,
            "every shard restored on the head",
        )
        seconds = time.monotonic() - killed
        load.wait(timeout=180)
    check_load(load)  # a popularity slate is fine while its shard was dead
    RECOVERY.append(f"second Ray node killed (shards {lost} on it) -> restored on the head: {seconds:.2f} s")
    verify(cluster.running)
