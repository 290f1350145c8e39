"""NATS JetStream: streams, in-order reading, the buffered publisher. Against a real server."""

from __future__ import annotations

import asyncio
import logging
from typing import cast

import orjson
import pytest
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import StreamConfig

from actors.live_backend import Gateway, LiveBackend, Serving
from api.render import Rendered
from system.bus import publisher as publisher_module
from system.bus import stream
from system.bus.publisher import MAX_EVENTS, Publisher, TooLarge
from system.core.catalog import Catalog
from system.core.catalog_file import read_movies
from system.core.errors import PayloadTooLarge, Unavailable
from system.core.events import SEEN, Event, decode
from system.core.popularity import Popularity
from system.core.settings import Settings
from system.core.sharding import SlotMap
from tests.conftest import SMALL_CSV

pytestmark = pytest.mark.integration


async def test_streams_are_created_once(js: JetStreamContext, settings: Settings) -> None:
    await stream.ensure_streams(js, settings)
    info = await js.stream_info(settings.stream)
    assert info.config.subjects == [settings.events_subject, f"{settings.events_subject}.>"]
    assert info.config.duplicate_window == stream.DUPLICATE_WINDOW
    dlq = await js.stream_info(settings.deadletter_stream)
    assert dlq.config.subjects == [settings.deadletter_subject]


async def test_cursor_and_ranges_read_in_order(js: JetStreamContext, settings: Settings) -> None:
    for i in range(1, 26):
        subject = settings.events_subject if i % 2 else f"{settings.events_subject}.api"
        await js.publish(subject, str(i).encode())
    cursor = stream.StreamCursor(js, settings.stream, 10)
    got: list[stream.StreamMessage] = []
    while len(got) < 16:
        got += await cursor.fetch(7, timeout=1.0)
    await cursor.close()
    assert [m.seq for m in got] == list(range(10, 26)) and [int(m.data) for m in got] == list(range(10, 26))
    ranged = [m.seq async for batch in stream.read_range(js, settings, 5, 12) for m in batch]
    assert ranged == list(range(6, 13))
    beyond = [m.seq async for batch in stream.read_range(js, settings, 20, 1000) for m in batch]
    assert beyond == list(range(21, 26))


async def test_publisher_packs_what_gathers_into_few_messages(js: JetStreamContext, settings: Settings) -> None:
    nc = await stream.connect(settings.nats_url or "", "test-publisher")
    publisher = Publisher(nc, per_message=100)
    subject = f"{settings.events_subject}.api"
    events = [orjson.dumps({"event_type": "seen", "entity_id": 1, "user_id": f"u{i}"}) for i in range(300)]
    assert all(publisher.submit_many(subject, [e]) for e in events)  # all queued before the publisher runs
    publisher.start()
    assert await publisher.publish(subject, [events[0]], timeout=5) == 4  # once stored, with its sequence
    assert publisher.published == 301 and publisher.messages == 4  # 100 + 100 + 100 + 1
    decoded = [decode(m.data) async for batch in stream.read_range(js, settings, 0, 10) for m in batch]
    assert [len(events) for events, errors in decoded] == [100, 100, 100, 1]
    assert [e.user for events, _ in decoded for e in events][:3] == ["u0", "u1", "u2"]
    await publisher.drain()
    await nc.close()


async def test_what_one_call_hands_over_is_stored_in_one_message_or_refused_whole(
    js: JetStreamContext, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A JetStream that refuses one message (over the stream's size limit) of what used to be a
    multi-message batch: the caller hears that its events were refused (no 202 over HTTP), and
    none of them is in the log; other callers' events, packed around it, are stored. (Before,
    600 events left as 500 + 100 and the caller heard only of the last message, which was stored.)"""
    monkeypatch.setattr(publisher_module, "MAX_ATTEMPTS", 1)
    config = (await js.stream_info(settings.stream)).config
    config.max_msg_size = 8_000
    await js.update_stream(config)
    nc = await stream.connect(settings.nats_url or "", "test-publisher")
    publisher = Publisher(nc, per_message=500)
    subject = f"{settings.events_subject}.api"

    def events(tag: str, n: int) -> list[bytes]:
        return [orjson.dumps({"event_type": "seen", "entity_id": 1, "user_id": f"{tag}{i}"}) for i in range(n)]

    small_before, big, small_after = events("a", 10), events("b", 600), events("c", 10)
    waits = [
        asyncio.ensure_future(publisher.publish(subject, batch, timeout=10))
        for batch in (small_before, big, small_after)
    ]
    await asyncio.sleep(0)  # all three queued before the publisher runs: they would share messages
    publisher.start()
    stored, refused, stored_too = await asyncio.gather(*waits, return_exceptions=True)
    assert isinstance(refused, Unavailable) and "refused" in str(refused)
    assert isinstance(stored, int) and isinstance(stored_too, int)
    users = [
        e.user
        for batch in [m async for b in stream.read_range(js, settings, 0, 100) for m in b]
        for e in decode(batch.data)[0]
    ]
    assert sorted(users) == sorted([f"a{i}" for i in range(10)] + [f"c{i}" for i in range(10)])
    assert publisher.dropped == 600 and publisher.published == 20
    # What cannot go in one message at all is refused at once, before it is queued.
    with pytest.raises(TooLarge):
        publisher.submit_many(subject, events("d", MAX_EVENTS + 1))
    with pytest.raises(TooLarge):
        await publisher.publish(subject, [b"x" * (publisher.max_bytes + 1)], timeout=1)
    # ... which the API answers with a 413 (POST /api/events: a request is one message).
    catalog = Catalog.from_movies(list(read_movies(SMALL_CSV)))
    serving = Serving.build(Rendered(catalog), Popularity.empty(), settings.policy())
    backend = LiveBackend(settings, serving, SlotMap.even(1), cast(Gateway, None), publisher)
    long_ids = [Event("😀" * 128, SEEN, (1,), f"{i:0>128}", "r" * 128, None) for i in range(MAX_EVENTS)]
    with pytest.raises(PayloadTooLarge, match="smaller batches"):
        await backend.publish_durably(long_ids, timeout=1)
    await publisher.drain()
    await nc.close()


async def test_publisher_buffer_is_bounded_and_all_or_nothing(js: JetStreamContext, settings: Settings) -> None:
    nc = await stream.connect(settings.nats_url or "", "test-publisher")
    publisher = Publisher(nc, max_buffer=3)  # not started: nothing drains the buffer
    assert publisher.submit_many("s", [b"1", b"2"])
    assert not publisher.submit_many("s", [b"3", b"4"]) and publisher.pending == 2
    with pytest.raises(Unavailable, match="buffer is full"):
        await publisher.publish("s", [b"5", b"6"], timeout=1)
    assert publisher.submit_many("s", [b"3"]) and publisher.pending == 3
    assert publisher.status()["rejected"] == 4
    await nc.close()


async def test_an_idle_fetch_that_times_out_is_no_fault(
    js: JetStreamContext, settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """On a quiet system an idle fetch timed out as a bare TimeoutError every minute or so, and
    the cursor and the router each logged a WARNING for it: nothing new is no fault."""
    cursor = stream.StreamCursor(js, settings.stream, 1)
    await js.publish(settings.events_subject, b"1")
    assert [m.seq for m in await cursor.fetch(10, timeout=1.0)] == [1]

    async def times_out(*args: object, **kwargs: object) -> list[object]:
        raise TimeoutError

    monkeypatch.setattr(cursor._sub, "fetch", times_out)
    with caplog.at_level(logging.DEBUG, logger=stream.log.name):
        assert await cursor.fetch(10, timeout=0.1) == []
    assert [r.levelno for r in caplog.records if r.name == stream.log.name] == [logging.DEBUG]
    await js.publish(settings.events_subject, b"2")
    got: list[int] = []
    for _ in range(30):  # each fetch waits up to 1 s for it
        if got := [m.seq for m in await cursor.fetch(10, timeout=1.0)]:
            break
    await cursor.close()
    assert got == [2]  # from where it was, on a fresh consumer


async def test_cursor_recovers_when_its_consumer_disappears(
    js: JetStreamContext, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A NATS restart drops ephemeral consumers: the cursor must notice and go on from its position."""
    monkeypatch.setattr(stream, "CONSUMER_CHECK_SECONDS", 0.0)
    cursor = stream.StreamCursor(js, settings.stream, 1)
    await js.publish(settings.events_subject, b"1")
    assert [m.seq for m in await cursor.fetch(10, timeout=1.0)] == [1]
    await js.delete_consumer(settings.stream, cursor._consumer)
    await js.publish(settings.events_subject, b"2")
    got: list[int] = []
    for _ in range(10):
        try:
            got += [m.seq for m in await cursor.fetch(10, timeout=0.3)]
        except NatsError:  # a fetch on a vanished consumer may fail once
            pass
        if got:
            break
    await cursor.close()
    assert got == [2]


async def test_a_message_jetstream_refuses_is_dropped_after_a_few_tries_and_the_rest_flows(
    js: JetStreamContext, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refusal a retry cannot fix (here: over the stream's size limit) must neither block the
    buffer for good nor vanish silently: its waiters hear of it, and it is counted."""
    monkeypatch.setattr(publisher_module, "MAX_ATTEMPTS", 2)
    subject = f"{settings.namespace}.small"
    await js.add_stream(StreamConfig(name=f"{settings.stream}_SMALL", subjects=[subject], max_msg_size=200))
    nc = await stream.connect(settings.nats_url or "", "test-publisher")
    publisher = Publisher(nc, linger=0)
    publisher.start()
    with pytest.raises(Unavailable, match="refused"):
        await publisher.publish(subject, [b"x" * 500], timeout=10)
    assert publisher.dropped == 1 and publisher.failures == 2
    await publisher.publish(subject, [b'"small"'], timeout=5)  # the buffer moved on
    assert publisher.published == 1
    await publisher.drain()
    await js.delete_stream(f"{settings.stream}_SMALL")
    await nc.close()


async def test_a_publisher_whose_loop_dies_of_a_bug_is_restarted(
    js: JetStreamContext, settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    nc = await stream.connect(settings.nats_url or "", "test-publisher")
    publisher = Publisher(nc, linger=0)
    real = publisher._next_message
    calls = []

    def buggy() -> object:
        calls.append(1)
        if len(calls) == 1:
            raise ZeroDivisionError("a bug")
        return real()

    monkeypatch.setattr(publisher, "_next_message", buggy)
    publisher.start()
    with caplog.at_level(logging.ERROR):
        await publisher.publish(settings.events_subject, [b'{"n": 1}'], timeout=5)
    assert publisher.published == 1 and "ZeroDivisionError" in (publisher.last_error or "")
    assert any(getattr(r, "task", None) == "publisher" for r in caplog.records)
    await publisher.drain()
    await nc.close()


async def test_a_replay_that_cannot_reach_nats_gives_up_after_logging_its_retries(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    nc = await stream.connect(settings.nats_url or "", "test-reader")
    js = nc.jetstream()
    await nc.close()
    with caplog.at_level(logging.WARNING), pytest.raises(Unavailable, match="cannot read stream"):
        async for _ in stream.read_range(js, settings, 0, 10, give_up_after=0.5):
            pass
    assert sum(r.getMessage() == "stream read failed; retrying" for r in caplog.records) >= 2
