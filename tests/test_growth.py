"""State that survives growth, without Ray (plain shards and router, real PostgreSQL and NATS):
memory within a budget of resident users, with `verify` exact and every evicted user whole
again when next needed; and one writer per slot, a frozen shard's late writes refused."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path

import numpy as np
import orjson
import pytest
import pytest_asyncio
from nats.js import JetStreamContext

from actors.router import EventRouter
from actors.shard import Shard
from system.core.errors import Unavailable
from system.core.events import parse_event
from system.core.recount import recount
from system.core.settings import Settings
from system.db.pool import short_lived_pool
from system.db.state_store import StateStore
from system.verify import Export, verify
from tests.pipeline import Pipeline, prepare, restored, start_pipeline, stop_pipeline, wait_for

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
BUDGET = 100  # resident users per shard


def events_for(users: int, per_user: int, seed: int) -> list[dict[str, object]]:
    """Impressions of 3 movies and, now and then, a click, for each of `users` users, with event
    ids (and a few events sent twice, as a publisher's retry)."""
    rng = np.random.default_rng(seed)
    out: list[dict[str, object]] = []
    for i in range(users * per_user):
        user = f"grow-{int(rng.integers(users))}"
        if rng.random() < 0.3:
            event = {"event_type": "clicked", "entity_id": int(rng.integers(1, 41)), "user_id": user}
        else:
            event = {
                "event_type": "seen",
                "entity_ids": rng.choice(np.arange(1, 41), 3, replace=False).tolist(),
                "user_id": user,
            }
        event["event_id"] = f"g{seed}-{i}"
        out.append(event)
        if rng.random() < 0.05:
            out.append(event)
    return out


@pytest_asyncio.fixture
async def pipeline(settings: Settings, js: JetStreamContext) -> AsyncIterator[Pipeline]:
    running = await start_pipeline(settings, js)
    yield running
    await stop_pipeline(running)


@pytest_asyncio.fixture
async def small_budget(settings: Settings, js: JetStreamContext) -> AsyncIterator[Pipeline]:
    running = await start_pipeline(dataclasses.replace(settings, resident_users=BUDGET), js)
    yield running
    await stop_pipeline(running)


async def test_memory_stays_within_the_budget_and_verify_stays_exact(small_budget: Pipeline) -> None:
    pipeline = small_budget
    events = events_for(users=900, per_user=4, seed=1)
    seq = 0
    for start in range(0, len(events), 50):
        seq = await pipeline.publish(events[start : start + 50])
    await pipeline.settle(seq)
    for shard in pipeline.shards.values():
        await shard.checkpoint()  # what is checkpointed may leave memory
    users = {str(e["user_id"]) for e in events}
    resident = {u for s in pipeline.shards.values() if s.state for u in s.state.users}
    assert all(s.state and len(s.state.users) <= BUDGET for s in pipeline.shards.values())
    assert len(users - resident) >= len(users) - 2 * BUDGET  # most of the 900 left memory

    report = await verify(pipeline.settings, lambda s: pipeline.shards[s].export(), len(pipeline.shards), 10)
    assert report.ok, report.as_dict()
    assert report.checkpoints is not None and report.checkpoints.users == len(users)
    assert report.live.users <= 2 * BUDGET and report.popularity_mismatches == 0

    # Every evicted user, when next needed, is loaded whole: their counts and ids as the
    # reference recount has them, and their slate built on them (clicked movies go last).
    catalog = pipeline.shards[0].state.catalog if pipeline.shards[0].state else None
    assert catalog is not None  # as the database numbered its facet values
    log = [(i, 0, [parse_event(e)]) for i, e in enumerate(events)]
    expected = recount(log, catalog.facet_ids_by_movie(), window=pipeline.settings.dedup_window, cap=100_000)
    evicted = sorted(users - resident)[:60]
    loaded_before = sum(s.users_loaded for s in pipeline.shards.values())
    for uxid in evicted:
        shard = pipeline.shard_of(uxid)
        answer = await shard.user_counts(uxid)
        assert answer is not None and [tuple(r) for r in answer["rows"]] == expected[uxid].rows(), uxid
        clicked = {key for key, clicks, *_ in expected[uxid].rows() if key > 0 and clicks}
        [picks] = await shard.slates([(uxid, 10)])
        assert isinstance(picks, tuple)
        slate, _ = picks
        assert not clicked & set(slate), uxid
    assert sum(s.users_loaded for s in pipeline.shards.values()) - loaded_before >= len(evicted)


async def test_a_frozen_shard_that_wakes_after_its_replacement_cannot_write(
    settings: Settings, js: JetStreamContext, tmp_path: Path
) -> None:
    """Shard 0 runs in a process of its own and is frozen (SIGSTOP) until a replacement has
    taken its slots, served and checkpointed; woken, its next checkpoint is refused, it stops
    serving, and nothing it wrote lands: verify finds the replacement's state, exactly."""
    await prepare(settings)
    values = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(settings).items()}
    with (tmp_path / "zombie.log").open("wb") as log:
        zombie = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.zombie_shard", json.dumps(values),
            cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=log, env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
    shard1 = Shard(1, settings, seed=1)
    replacement = Shard(0, settings, seed=0)
    router = EventRouter(settings, NoPositions())
    try:
        assert zombie.stdout is not None
        assert (await asyncio.wait_for(zombie.stdout.readline(), 30)).strip() == b"ready"
        await restored(shard1)
        router.ensure_running()
        users = [f"fence-{i}" for i in range(40)]
        first = await publish_clicks(js, settings, users, "before")
        await wait_checkpointed(settings, first)  # the zombie applied and checkpointed them

        zombie.send_signal(signal.SIGSTOP)
        await restored(replacement)  # takes the slots: a new epoch
        second = await publish_clicks(js, settings, users, "after")
        await wait_for(lambda: replacement.covered >= second and shard1.covered >= second)
        await replacement.checkpoint()
        zombie.send_signal(signal.SIGCONT)  # wakes up with the spans it missed and a stale epoch
        assert (await asyncio.wait_for(zombie.stdout.readline(), 30)).strip() == b"fenced"
        assert await asyncio.wait_for(zombie.wait(), 30) == 0

        third = await publish_clicks(js, settings, users, "later")  # the replacement goes on
        await wait_for(lambda: replacement.covered >= third and shard1.covered >= third)
        await replacement.checkpoint()
        await shard1.checkpoint()
        shards = {0: replacement, 1: shard1}
        report = await verify(settings, lambda s: shards[s].export(), 2, 10)
        assert report.ok, report.as_dict()
        assert report.checkpoints is not None and report.checkpoints.users == len(users)
    finally:
        if zombie.returncode is None:
            zombie.send_signal(signal.SIGCONT)
            zombie.kill()
            await zombie.wait()
        await router.stop()
        await replacement.stop()
        await shard1.stop()
    assert "fenced" in (tmp_path / "zombie.log").read_text()


class NoPositions:
    """The router asks shards their position; here the checkpoints tell it."""

    async def covered(self, shard: int) -> int | None:
        return None


async def publish_clicks(js: JetStreamContext, settings: Settings, users: list[str], tag: str) -> int:
    """One click per user on movie 1..40, with event ids; returns the stream sequence reached."""
    events = [
        {"event_type": "clicked", "entity_id": 1 + i % 40, "user_id": u, "event_id": f"{tag}-{u}"}
        for i, u in enumerate(users)
    ]
    ack = await js.publish(settings.events_subject, orjson.dumps(events))
    return int(ack.seq)


async def wait_checkpointed(settings: Settings, seq: int) -> None:
    async with short_lived_pool(settings.database_url or "", "test") as pool:
        store = StateStore(pool)
        for _ in range(500):
            if await store.oldest_checkpoint() >= seq:
                return
            await asyncio.sleep(0.02)
    raise AssertionError(f"the checkpoints did not reach #{seq}")


@pytest.mark.parametrize("checkpoint_interval", [3600.0])  # only the explicit checkpoints below
async def test_verify_reaches_back_as_far_as_the_checkpoints_and_the_retained_log(pipeline: Pipeline) -> None:
    """Retention trims the log: verify then starts from the checkpoints and recounts only the
    events after them; with a checkpoint older than what is retained, it refuses and says why."""
    events = events_for(users=50, per_user=4, seed=2)
    seq = 0
    for start in range(0, len(events) // 2, 20):
        seq = await pipeline.publish(events[start : start + 20])
    await pipeline.settle(seq)
    for shard in pipeline.shards.values():
        await shard.checkpoint()
    checkpointed = seq
    for start in range(len(events) // 2, len(events), 20):
        seq = await pipeline.publish(events[start : start + 20])
    await pipeline.settle(seq)

    def export(s: int) -> Awaitable[Export]:
        return pipeline.shards[s].export()

    await pipeline.js.purge_stream(pipeline.settings.stream, seq=checkpointed + 1)  # keeps #checkpointed+1 on
    report = await verify(pipeline.settings, export, 2, 10)
    assert report.ok and report.since == checkpointed + 1 and report.checkpoints is None, report.as_dict()
    assert report.live.users == len({e["user_id"] for e in events})

    await pipeline.js.purge_stream(pipeline.settings.stream, seq=checkpointed + 3)  # two events too many
    with pytest.raises(Unavailable, match="lost to retention"):
        await verify(pipeline.settings, export, 2, 10)
