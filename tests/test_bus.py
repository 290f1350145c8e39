"""NATS JetStream: streams, in-order reading, the buffered publisher. Against a real server."""

from __future__ import annotations

import asyncio

import pytest

from system import bus
from system.settings import Settings

pytestmark = pytest.mark.integration


async def test_streams_are_created_once(js: object, settings: Settings) -> None:
    await bus.ensure_streams(js, settings)  # type: ignore[arg-type]
    info = await js.stream_info(settings.stream)  # type: ignore[attr-defined]
    assert info.config.subjects == [settings.events_subject, f"{settings.events_subject}.>"]
    assert info.config.duplicate_window == bus.DUPLICATE_WINDOW
    dlq = await js.stream_info(f"{settings.stream}_DLQ")  # type: ignore[attr-defined]
    assert dlq.config.subjects == [settings.deadletter_subject]


async def test_cursor_and_ranges_read_in_order(js: object, settings: Settings) -> None:
    for i in range(1, 26):
        subject = settings.events_subject if i % 2 else f"{settings.events_subject}.api"
        await js.publish(subject, str(i).encode())  # type: ignore[attr-defined]
    cursor = bus.StreamCursor(js, settings.stream, 10)  # type: ignore[arg-type]
    got = []
    while len(got) < 16:
        got += await cursor.fetch(7, timeout=1.0)
    await cursor.close()
    assert [m.seq for m in got] == list(range(10, 26)) and [int(m.data) for m in got] == list(range(10, 26))
    ranged = [m.seq async for batch in bus.read_range(js, settings, 5, 12) for m in batch]  # type: ignore[arg-type]
    assert ranged == list(range(6, 13))
    beyond = [m.seq async for batch in bus.read_range(js, settings, 20, 1000) for m in batch]  # type: ignore[arg-type]
    assert beyond == list(range(21, 26))


async def test_publisher_publishes_once_per_message_id(js: object, settings: Settings) -> None:
    publisher = bus.Publisher(js)  # type: ignore[arg-type]
    publisher.start()
    for i in range(300):
        assert publisher.submit(f"{settings.events_subject}.api", b"x", f"id-{i % 200}")
    await publisher.drain()
    assert publisher.published == 300
    assert await bus.last_seq(js, settings.stream) == 200  # type: ignore[arg-type]  # JetStream dropped 100 repeats


async def test_publisher_buffer_is_bounded(js: object, settings: Settings) -> None:
    publisher = bus.Publisher(js, max_buffer=3)  # type: ignore[arg-type]
    assert all(publisher.submit("s", b"x", str(i)) for i in range(3))
    assert not publisher.submit("s", b"x", "4") and publisher.pending == 3
    await asyncio.sleep(0)
