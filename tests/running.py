"""`mabrec up` as a child process, the way a user runs it, and an HTTP client for it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from system.embedded import Runtime, pid_alive

MABREC = str(Path(sys.executable).parent / "mabrec")


class RunningSystem:
    def __init__(self, state_dir: Path, env: dict[str, str]) -> None:
        self.state_dir = state_dir
        self.env = {
            **{
                k: v for k, v in os.environ.items() if not k.startswith(("MABREC_", "DATABASE_URL", "NATS_URL", "RAY_"))
            },
            "MABREC_STATE_DIR": str(state_dir),
            "MABREC_PORT": "0",
            "MABREC_DASHBOARD": "0",
            "MABREC_SHARDS": "2",
            "MABREC_CHECKPOINT_INTERVAL": "0.2",
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.runtime: Runtime | None = None
        self.http: httpx.Client | None = None
        self.log = state_dir / "supervisor.log"
        self.started_in = 0.0

    def start(self, timeout: float = 90.0) -> RunningSystem:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        began = time.monotonic()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([MABREC, "up"], env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = began + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mabrec up exited with {self.proc.returncode}:\n{self.tail()}")
            runtime = Runtime.load(self.state_dir)
            if runtime is not None and runtime.supervisor_pid == self.proc.pid:
                self.runtime = runtime
                if self.http is None:
                    self.http = httpx.Client(base_url=runtime.api_url, timeout=10.0)
                try:
                    if self.http.get("/readyz").status_code == 200:
                        self.started_in = time.monotonic() - began
                        return self
                except httpx.HTTPError:
                    pass
            time.sleep(0.1)
        self.kill()
        raise TimeoutError(f"mabrec up was not ready within {timeout}s:\n{self.tail()}")

    def stop(self, timeout: float = 90.0) -> int:
        """SIGTERM, as a user's Ctrl-C or an orchestrator would; returns the exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        if self.http:
            self.http.close()
            self.http = None
        return code

    def kill(self) -> None:
        """SIGKILL the supervisor, then stop what it had started (by the PIDs it recorded)."""
        from system.embedded import stop_pid

        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.http:
            self.http.close()
            self.http = None
        runtime = Runtime.load(self.state_dir) or self.runtime
        for service in reversed(runtime.services if runtime else []):
            if pid_alive(service.pid):
                stop_pid(service.pid, signal.SIGTERM if service.name == "ray" else signal.SIGINT)

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def get(self, path: str, uxid: str | None = None, **kwargs: object) -> httpx.Response:
        assert self.http is not None
        headers = {"uxid": uxid} if uxid is not None else {}
        return self.http.get(path, headers=headers, **kwargs)  # type: ignore[arg-type]
