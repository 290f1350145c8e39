"""Child processes we start, and stop by PID only (never by name): ports, liveness, signals."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
# Popen objects of the children we run, by PID: a dropped Popen of a live process warns, and
# holding it lets `stop_pid` reap the child.
_children: dict[int, subprocess.Popen[bytes]] = {}


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
    stop_pids([(pid, sig)], timeout)


def stop_pids(signals: list[tuple[int, int]], timeout: float) -> None:
    """`stop_pid` for several processes at once, under one deadline: each gets its signal (in
    the order given), and whatever of them and their children is left after `timeout` is killed."""
    import psutil

    family: list[psutil.Process] = []
    for pid, sig in signals:
        with contextlib.suppress(psutil.NoSuchProcess):
            family += [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    _, alive = psutil.wait_procs(family, timeout=timeout)
    for proc in alive:
        log.warning("process did not stop in time; killing it", extra={"pid": proc.pid})
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)
    for pid, _ in signals:
        child = _children.pop(pid, None)
        if child is not None:
            child.wait(timeout=5)


def stop_children(timeout: float) -> None:
    """Stop every process this one spawned and still holds (a last resort: by PID, as `spawn`
    recorded them, whether or not anyone adopted them as a service yet)."""
    stop_pids([(pid, signal.SIGTERM) for pid, child in list(_children.items()) if child.poll() is None], timeout)


def port_taken(host: str, port: int) -> bool:
    """Whether something listens on (host, port) already: a plain bind (no SO_REUSEPORT) fails
    while any socket holds the port, whichever options it set."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers do not count
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def spawn(cmd: list[str], log_file: Path, **kwargs: Any) -> subprocess.Popen[bytes]:
    log_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)  # logs name users: owner only
    os.fchmod(fd, 0o600)
    with open(fd, "ab") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, **kwargs
        )
    _children[proc.pid] = proc
    return proc
