"""`mabrec up` as a child process, the way a user runs it, and an HTTP client for it: what the
benchmark report and the end-to-end tests start."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx

from system.local import admin_token
from system.local.processes import pid_alive, stop_pid
from system.local.runtime import Runtime

MABREC = str(Path(sys.executable).parent / "mabrec")
LAUNCHER = str(Path(__file__).resolve().parents[1] / "mabrec")  # ./mabrec: the README's command


class RunningSystem:
    """`mabrec up` with this state dir and these variables (and none of the caller's MABREC_*,
    DATABASE_URL, NATS_URL or RAY_*: unset, the servers are embedded), on a free port."""

    def __init__(self, state_dir: Path, env: dict[str, str], *, session: bool = False, command: str = MABREC) -> None:
        self.state_dir = state_dir
        self.env = {
            **{
                k: v for k, v in os.environ.items() if not k.startswith(("MABREC_", "DATABASE_URL", "NATS_URL", "RAY_"))
            },
            "MABREC_STATE_DIR": str(state_dir),
            "MABREC_PORT": "0",
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.runtime: Runtime | None = None
        self.http: httpx.Client | None = None  # sends the admin token: tests and benchmarks read /api/status
        self.admin_headers: dict[str, str] = {}
        self.log = state_dir / "supervisor.log"
        self.started_in = 0.0
        self.session = session  # its own process group, as a terminal's foreground job (`interrupt`)
        self.command = command  # the venv's mabrec, or LAUNCHER (which becomes it: the same PID)

    def start(self, timeout: float = 90.0) -> RunningSystem:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        began = time.monotonic()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [self.command, "up"], env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=self.session
            )
        try:
            return self._wait_ready(began, timeout)
        except BaseException:  # not ready, or the caller was stopped meanwhile: nothing left behind
            if self.proc.poll() is None:
                try:
                    self.stop(timeout=60)
                except subprocess.TimeoutExpired:
                    pass  # killed, with everything it started
            self.kill()
            raise

    def _wait_ready(self, began: float, timeout: float) -> RunningSystem:
        assert self.proc is not None
        while time.monotonic() < began + timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mabrec up exited with {self.proc.returncode}:\n{self.tail()}")
            runtime = Runtime.load(self.state_dir)
            if runtime is not None and runtime.supervisor_pid == self.proc.pid:
                self.runtime = runtime
                if self.http is None:
                    token = (
                        self.env.get("MABREC_ADMIN_TOKEN") or (self.state_dir / admin_token.FILE).read_text().strip()
                    )
                    admin_token.remember(runtime.api_url, token)
                    self.admin_headers = admin_token.headers(runtime.api_url)
                    self.http = httpx.Client(base_url=runtime.api_url, timeout=10.0, headers=self.admin_headers)
                try:
                    if self.http.get("/readyz").status_code == 200:
                        self.started_in = time.monotonic() - began
                        return self
                except httpx.HTTPError:
                    pass
            time.sleep(0.1)
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

    def interrupt(self, timeout: float = 90.0) -> int:
        """Ctrl-C as a terminal sends it: SIGINT to the whole process group (`session=True`)."""
        assert self.proc is not None and self.session
        os.killpg(self.proc.pid, signal.SIGINT)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        finally:
            if self.http:
                self.http.close()
                self.http = None

    def kill(self) -> None:
        """SIGKILL the supervisor, then stop what it had started (by the PIDs it recorded)."""
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

    def get(
        self,
        path: str,
        uxid: str | None = None,
        params: dict[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        """GET `path`, as `uxid` (sent as UTF-8 bytes, as the API reads the header) when given."""
        assert self.http is not None
        sent = [(k.encode(), v.encode()) for k, v in {**(headers or {}), **({"uxid": uxid} if uxid else {})}.items()]
        return self.http.get(path, headers=sent, params=params)

    def __enter__(self) -> RunningSystem:
        return self if self.proc is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        try:
            code = self.stop()
        except subprocess.TimeoutExpired:
            return  # killed, with everything it started
        if code != 0:
            raise RuntimeError(f"mabrec up exited with {code}:\n{self.tail()}")


def wait_until(condition: Callable[[], object], timeout: float, what: str, poll: float = 0.02) -> float:
    """Poll `condition` until it is true; the seconds that took. AssertionError naming `what`
    after `timeout` (a condition that raises counts as not yet)."""
    began = time.monotonic()
    last: Exception | None = None
    while True:
        try:
            if condition():
                return time.monotonic() - began
        except Exception as exc:  # noqa: BLE001 - not there yet (a restarting server, a missing key)
            last = exc
        if time.monotonic() - began > timeout:
            raise AssertionError(f"{what}: not within {timeout} s" + (f" (last error: {last!r})" if last else ""))
        time.sleep(poll)
