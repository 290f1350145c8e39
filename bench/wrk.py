"""Closed-loop slates with wrk (Debian's `wrk`), the load generator the issues measure with: C,
so it leaves the cores to the system. Each request is for one of `users` users (a Lua script
sets the uxid header). Runs only against 127.0.0.1."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

SCRIPT = """
local users = %d
math.randomseed(7)
request = function()
  return wrk.format("GET", "/api/recommendations/movies?limit=10", {uxid = "wrk-" .. math.random(0, users - 1)})
end
"""

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def available() -> bool:
    return shutil.which("wrk") is not None


def run(
    url: str, *, connections: int = 64, threads: int = 2, seconds: float = 15.0, users: int = 10_000
) -> dict[str, Any]:
    """wrk -t`threads` -c`connections` for `seconds`: slates/s, latency percentiles, errors."""
    if urlsplit(url).hostname != "127.0.0.1":
        raise ValueError("load tests target 127.0.0.1 only")
    with tempfile.TemporaryDirectory(prefix="mabrec-wrk-") as tmp:
        script = Path(tmp) / "slates.lua"
        script.write_text(SCRIPT % users)
        out = subprocess.run(
            ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s", "--latency", "-s", str(script), url],
            capture_output=True, text=True, check=True, timeout=seconds + 60,
        ).stdout  # fmt: skip
    return parse(out) | {"connections": connections, "threads": threads, "users": users}


def parse(out: str) -> dict[str, Any]:
    """The figures of wrk's report (with --latency)."""
    latency = {
        f"p{q}_ms": round(float(v) * _UNITS[unit], 3)
        for q, v, unit in re.findall(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s)\s*$", out, re.MULTILINE)
    }
    requests, rate = re.search(r"(\d+) requests in", out), re.search(r"Requests/sec:\s+([\d.]+)", out)
    if requests is None or rate is None:
        raise ValueError(f"wrk printed no request count or rate:\n{out}")
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    socket = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = (int(non_2xx.group(1)) if non_2xx else 0) + (sum(map(int, socket.groups())) if socket else 0)
    return {"requests": int(requests.group(1)), "rate_per_s": round(float(rate.group(1))), "errors": errors, **latency}
