"""NATS JetStream: streams, in-order reading, the buffered publisher. Against a real server."""

from __future__ import annotations

import orjson
import pytest

from system import bus
from system.errors import Unavailable
from system.events import decode
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


async def test_publisher_packs_what_gathers_into_few_messages(js: object, settings: Settings) -> None:
    nc = await bus.connect(settings.nats_url or "", "test-publisher")
    publisher = bus.Publisher(nc, per_message=100)
    subject = f"{settings.events_subject}.api"
    events = [orjson.dumps({"event_type": "seen", "entity_id": 1, "user_id": f"u{i}"}) for i in range(300)]
    assert publisher.submit_many(subject, events)  # all queued before the publisher runs
    publisher.start()
    await publisher.publish(subject, [events[0]], timeout=5)  # returns once stored
    assert publisher.published == 301 and publisher.messages == 4  # 100 + 100 + 100 + 1
    decoded = [decode(m.data) async for batch in bus.read_range(js, settings, 0, 10) for m in batch]  # type: ignore[arg-type]
    assert [len(events) for events, errors in decoded] == [100, 100, 100, 1]
    assert [e.user for events, _ in decoded for e in events][:3] == ["u0", "u1", "u2"]
    await publisher.drain()
    await nc.close()


async def test_publisher_buffer_is_bounded_and_all_or_nothing(js: object, settings: Settings) -> None:
    nc = await bus.connect(settings.nats_url or "", "test-publisher")
    publisher = bus.Publisher(nc, max_buffer=3)  # not started: nothing drains the buffer
    assert publisher.submit_many("s", [b"1", b"2"])
    assert not publisher.submit_many("s", [b"3", b"4"]) and publisher.pending == 2
    with pytest.raises(Unavailable, match="buffer is full"):
        await publisher.publish("s", [b"5", b"6"], timeout=1)
    assert publisher.submit_many("s", [b"3"]) and publisher.pending == 3
    assert publisher.status()["rejected"] == 4
    await nc.close()


async def test_cursor_recovers_when_its_consumer_disappears(
    js: object, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A NATS restart drops ephemeral consumers: the cursor must notice and go on from its position."""
    monkeypatch.setattr(bus, "CONSUMER_CHECK_SECONDS", 0.0)
    cursor = bus.StreamCursor(js, settings.stream, 1)  # type: ignore[arg-type]
    await js.publish(settings.events_subject, b"1")  # type: ignore[attr-defined]
    assert [m.seq for m in await cursor.fetch(10, timeout=1.0)] == [1]
    await js.delete_consumer(settings.stream, cursor._consumer)  # type: ignore[attr-defined]
    await js.publish(settings.events_subject, b"2")  # type: ignore[attr-defined]
    got: list[int] = []
    for _ in range(10):
        try:
            got += [m.seq for m in await cursor.fetch(10, timeout=0.3)]
        except Exception:  # noqa: BLE001 - a fetch on a vanished consumer may fail once
            pass
        if got:
            break
    await cursor.close()
    assert got == [2]
