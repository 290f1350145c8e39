"""What JetStream's disk sync costs: ingestion with `sync_interval` always (mabrec's default,
MABREC_NATS_SYNC), a short interval, and NATS's own default (2 minutes), each on a fresh
nats-server of its own (the one `mabrec up` embeds), with the event shapes mabrec sees:
producers' messages of 100 events at 20,000 events/s, single-event messages as fast as they go,
and one acknowledgement at a time."""

from __future__ import annotations

import asyncio
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from system.bus import stream
from system.core.settings import Settings
from system.local.processes import free_port, spawn, stop_pid, wait_for_port
from system.local.servers import nats_executable

SYNCS = ("always", "1s", "default")  # "default": NATS's own (no sync_interval)


async def run(sync: str, seconds: float = 5.0) -> dict[str, Any]:
    """One server with this `sync_interval`, measured."""
    work = Path(tempfile.mkdtemp(prefix="mbr-sync-"))
    config = work / "nats.conf"
    config.write_text("jetstream {}\n" if sync == "default" else f"jetstream {{ sync_interval: {sync} }}\n")
    port = free_port()
    command = [str(nats_executable()), "-c", str(config), "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(work)]
    proc = spawn(command, work / "nats.log")
    try:
        wait_for_port(port, 15, proc, work / "nats.log")
        nc = await stream.connect(f"nats://127.0.0.1:{port}", "bench-durability")
        js = nc.jetstream()
        settings = Settings(namespace="durability")
        await stream.ensure_streams(js, settings)
        out: dict[str, Any] = {"sync_interval": sync}
        out["batched"] = await _paced(js, settings.events_subject, rate=20_000, per_message=100, seconds=seconds)
        out["single_event_messages_per_s"] = await _flood(js, settings.events_subject, seconds=min(seconds, 4.0))
        out["one_ack_ms"] = await _one_at_a_time(js, settings.events_subject, count=300)
        await nc.close()
        return out
    finally:
        stop_pid(proc.pid, signal.SIGTERM)
        shutil.rmtree(work, ignore_errors=True)


def _event(i: int) -> dict[str, Any]:
    return {"event_type": "seen", "entity_id": 1, "user_id": f"u{i}", "event_id": f"e{i}"}


async def _paced(js: Any, subject: str, rate: float, per_message: int, seconds: float) -> dict[str, float]:
    """Messages of `per_message` events offered at `rate` events/s, acknowledgements pipelined."""
    body = orjson.dumps([_event(i) for i in range(per_message)])
    latencies: list[float] = []

    async def one() -> None:
        began = time.perf_counter()
        await js.publish(subject, body)
        latencies.append(time.perf_counter() - began)

    pending, sent, start = [], 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        due = start + sent * per_message / rate
        if (wait := due - time.perf_counter()) > 0:
            await asyncio.sleep(wait)
        pending.append(asyncio.ensure_future(one()))
        sent += 1
    await asyncio.gather(*pending)
    elapsed = time.perf_counter() - start
    latencies.sort()
    return {
        "events_per_s": round(sent * per_message / elapsed),
        "ack_p50_ms": round(latencies[len(latencies) // 2] * 1000, 2),
        "ack_p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 2),
    }


async def _flood(js: Any, subject: str, seconds: float) -> int:
    """Single-event messages, 200 acknowledgements in flight: messages per second."""
    body = orjson.dumps(_event(0))
    sent, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        await asyncio.gather(*[await js.publish_async(subject, body) for _ in range(200)])
        sent += 200
    return round(sent / (time.perf_counter() - start))


async def _one_at_a_time(js: Any, subject: str, count: int) -> dict[str, float]:
    body = orjson.dumps(_event(0))
    latencies = []
    for _ in range(count):
        began = time.perf_counter()
        await js.publish(subject, body)
        latencies.append(time.perf_counter() - began)
    latencies.sort()
    return {"p50": round(latencies[count // 2] * 1000, 3), "p99": round(latencies[int(count * 0.99)] * 1000, 3)}


async def run_all(seconds: float = 5.0) -> list[dict[str, Any]]:
    return [await run(sync, seconds) for sync in SYNCS]


def markdown(runs: list[dict[str, Any]]) -> list[str]:
    lines = [
        "JetStream's disk sync (`sync_interval`; mabrec writes `always`, MABREC_NATS_SYNC), each on a fresh",
        "nats-server of the embedded kind:",
        "",
        "| sync_interval | 100-event messages at 20,000 events/s: events/s, ack p50 / p99 ms | single-event messages/s (200 in flight) | one ack at a time, p50 / p99 ms |",
        "|---|---|---|---|",
    ]
    for r in runs:
        b, one = r["batched"], r["one_ack_ms"]
        name = "NATS's default (2 min)" if r["sync_interval"] == "default" else r["sync_interval"]
        lines.append(
            f"| {name} | {b['events_per_s']:,}, {b['ack_p50_ms']} / {b['ack_p99_ms']} | "
            f"{r['single_event_messages_per_s']:,} | {one['p50']} / {one['p99']} |"
        )
    return lines
