"""The runtime file, `<state>/runtime.json`: what a running `mabrec up` tells other commands run
from the same directory (`mabrec status`, `mabrec verify`, a supervisor restarted after a crash,
which adopts servers that still run instead of starting twins)."""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from system.local import secret_files
from system.local.processes import pid_alive


@dataclass
class Service:
    name: str
    pid: int
    url: str
    monitor_url: str | None = None  # its monitoring endpoint, if it has one (NATS: /varz, /jsz, /healthz)
    owned: bool = True  # started by this supervisor (stopped on exit) or adopted

    def alive(self) -> bool:
        return pid_alive(self.pid)


@dataclass
class Runtime:
    """What a running `mabrec up` tells other commands run from the same directory."""

    supervisor_pid: int
    api_url: str
    database_url: str
    nats_url: str
    ray_address: str
    namespace: str
    dashboard_url: str | None
    services: list[Service]
    # Ray's metrics export of the node the supervisor runs on (Prometheus text: Ray's and mabrec's
    # own, actors/ray_metrics.py). Last, with a default: runtime files written before it load.
    metrics_url: str | None = None

    def save(self, state_dir: Path) -> None:
        # It holds the servers' passwords: owner only.
        secret_files.write_private(state_dir / "runtime.json", json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, state_dir: Path) -> Runtime | None:
        path = state_dir / "runtime.json"
        if not path.exists():
            return None
        raw = json.loads(path.read_text())
        raw["services"] = [Service(**s) for s in raw.get("services", [])]
        return cls(**raw)

    @staticmethod
    def remove(state_dir: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            (state_dir / "runtime.json").unlink()

    def service(self, name: str) -> Service | None:
        return next((s for s in self.services if s.name == name and s.alive()), None)
