"""Events from NATS to shard state, without Ray: the plain Shard and EventRouter classes against
real PostgreSQL and NATS JetStream (Ray only wraps them; test_e2e runs them as actors)."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import orjson
import psycopg
import pytest
import pytest_asyncio
from nats.js import JetStreamContext

from actors.router import IDLE_ADVANCE
from actors.shard import APPLY_CHUNK, PastStreamEnd, Shard, ShardNotReady
from system.bus import dataplane, stream
from system.core import userstate
from system.core.errors import NotThisOne, Unavailable
from system.core.events import CLICKED, Event
from system.core.health import HealthMonitor, shard_key
from system.core.settings import Settings
from system.core.shard_state import SEEN_IDS, ShardState
from system.core.sharding import slot_of, slot_ranges
from system.db.pool import short_lived_pool
from system.db.state_store import StateStore
from tests.pipeline import (
    Pipeline,
    covered_by_slot,
    next_commit_unanswered,
    prepare,
    restored,
    start_pipeline,
    stop_pipeline,
    wait_for,
)
from tests.stats import clearly_more

pytestmark = pytest.mark.integration


@pytest_asyncio.fixture
async def pipeline(settings: Settings, js: JetStreamContext) -> AsyncIterator[Pipeline]:
    running = await start_pipeline(settings, js)
    yield running
    await stop_pipeline(running)


def posterior(shard: Shard, uxid: str, key: int) -> tuple[int, int]:
    assert shard.state is not None
    return userstate.posterior(shard.state.counts_of(uxid), key)


async def test_original_event_shape_on_the_documented_subject_updates_the_user(pipeline: Pipeline) -> None:
    seq = await pipeline.publish({"event_type": "clicked", "entity_type": "movies", "entity_id": 2, "user_id": "u1"})
    seq = await pipeline.publish({"event_type": "seen", "entity_type": "movies", "entity_id": 2, "user_id": "u1"})
    await pipeline.settle(seq, "u1")
    assert posterior(pipeline.shard_of("u1"), "u1", 2) == (2, 2)


async def test_malformed_events_are_dead_lettered_and_the_next_good_one_applies(pipeline: Pipeline) -> None:
    settings, js = pipeline.settings, pipeline.js
    dlq = await js.subscribe(settings.deadletter_subject)
    await pipeline.publish(b"{oops")
    await pipeline.publish({"event_type": "liked", "entity_id": 2, "user_id": "u2"})
    await pipeline.publish({"event_type": "seen", "entity_id": 424242, "user_id": "u2"})
    # All or nothing: a good event in a batch with an unknown movie does not count either.
    await pipeline.publish(
        [
            {"event_type": "clicked", "entity_id": 4, "user_id": "u2"},
            {"event_type": "seen", "entity_ids": [1, 2, 99999999], "user_id": "u2"},
        ]
    )
    seq = await pipeline.publish({"event_type": "clicked", "entity_id": 3, "user_id": "u2"})
    await pipeline.settle(seq, "u2")
    shard = pipeline.shard_of("u2")
    assert posterior(shard, "u2", 3) == (2, 1)
    assert [posterior(shard, "u2", m) for m in (1, 2, 4)] == [(1, 1)] * 3
    assert dict(pipeline.router.dead_letters) == {"not_json": 1, "invalid": 1, "unknown_movie": 2}
    letters = [await dlq.next_msg(timeout=5) for _ in range(4)]
    assert [(m.headers or {}).get("Mabrec-Error") for m in letters] == [
        "not_json",
        "invalid",
        "unknown_movie",
        "unknown_movie",
    ]
    assert orjson.loads(letters[3].data)[0]["entity_id"] == 4  # the whole message, for whoever fixes it
    assert pipeline.router.status()["running"]


async def test_a_shard_that_missed_a_call_replays_the_gap_from_the_stream(pipeline: Pipeline) -> None:
    await pipeline.router.stop()  # take over the router's job by hand
    shard = pipeline.shard_of("gap-user")
    first = await pipeline.publish({"event_type": "clicked", "entity_id": 5, "user_id": "gap-user"})
    second = await pipeline.publish({"event_type": "clicked", "entity_id": 8, "user_id": "gap-user"})
    covered = shard.covered
    # The call carrying `first` was lost; the next call covers (first, second] and says so.
    await shard.apply(first, second, [(second, 0, Event("gap-user", CLICKED, (8,)))])
    assert shard.covered == second and shard.gaps == 1 and covered < first
    assert posterior(shard, "gap-user", 5) == (2, 1) and posterior(shard, "gap-user", 8) == (2, 1)
    # A redelivery of what is already covered changes nothing.
    await shard.apply(
        covered, second, [(first, 0, Event("gap-user", CLICKED, (5,))), (second, 0, Event("gap-user", CLICKED, (8,)))]
    )
    assert posterior(shard, "gap-user", 5) == (2, 1)


async def test_a_span_past_the_end_of_the_stream_is_refused(pipeline: Pipeline) -> None:
    """A forged span (NATS permissions keep producers off the shard subjects; this is the shard's
    own check) would move `covered` past events still to come, and the shard would skip them."""
    shard = pipeline.shard_of("forged-user")
    end = await pipeline.publish({"event_type": "clicked", "entity_id": 5, "user_id": "forged-user"})
    await pipeline.settle(end, "forged-user")
    with pytest.raises(PastStreamEnd):
        await shard.apply(end, end + 1000, [(end + 1, 0, Event("forged-user", CLICKED, (8,)))])
    with pytest.raises(PastStreamEnd):
        await shard.apply(end + 1000, end, [])
    assert shard.covered == end and shard.status()["refused_spans"] == 2
    assert posterior(shard, "forged-user", 8) == (1, 1)
    nxt = await pipeline.publish({"event_type": "clicked", "entity_id": 8, "user_id": "forged-user"})
    await pipeline.settle(nxt, "forged-user")
    assert posterior(shard, "forged-user", 8) == (2, 1)  # the real next event is not skipped


async def test_a_lost_last_span_is_repaired_by_the_heartbeat(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The span carrying a user's last event is lost and no event follows: the router's idle
    heartbeat still tells the shard where the stream is, and the shard replays what it missed."""
    router, shard = pipeline.router, pipeline.shard_of("lost-user")
    await wait_for(lambda: router._nc is not None)
    nc = router._nc
    assert nc is not None
    subject = dataplane.apply_subject(pipeline.settings.namespace, shard.shard_id)
    dropped: list[bytes] = []
    publish = nc.publish

    async def lossy(subj: str, payload: bytes = b"", *args: Any, **kwargs: Any) -> None:
        if subj == subject and not dropped and dataplane.decode_apply(payload)[2]:  # a span with events
            dropped.append(payload)
            return
        await publish(subj, payload, *args, **kwargs)

    monkeypatch.setattr(nc, "publish", lossy)
    seq = await pipeline.publish({"event_type": "clicked", "entity_id": 5, "user_id": "lost-user"})
    await wait_for(lambda: bool(dropped))
    await pipeline.settle(seq, "lost-user", timeout=3 * IDLE_ADVANCE)
    assert posterior(shard, "lost-user", 5) == (2, 1) and shard.gaps >= 1


@pytest.mark.parametrize("checkpoint_interval", [3600.0])  # only the explicit checkpoint below
async def test_a_restarted_shard_recovers_checkpoint_plus_replay_exactly(pipeline: Pipeline) -> None:
    rng = np.random.default_rng(1)
    events = [
        {
            "event_type": "clicked" if rng.random() < 0.2 else "seen",
            "entity_id": int(rng.integers(1, 41)),
            # After the checkpoint, a third of the users (users 10..19 are shard 0's: half of its own).
            "user_id": f"user-{rng.integers(30) if i <= 200 else rng.choice([10, 11, 12, 13, 14, 0, 1, 2, 3, 4])}",
            "event_id": f"e{i}",
        }
        for i in range(350)
    ]
    last = 0
    for i, event in enumerate(events + events[-50:]):  # the last 50 twice: a publisher's retry
        last = await pipeline.publish(event)
        if i == 200:
            await pipeline.settle(last)
            await asyncio.gather(*(s.checkpoint() for s in pipeline.shards.values()))
    await pipeline.settle(last)
    live = pipeline.shards[0]
    assert live.state is not None and live.state.duplicates > 0
    # A new incarnation (what Ray starts after a crash) restores the checkpoint taken at event
    # 200 and replays the rest from the stream.
    reborn = Shard(0, pipeline.settings)
    with pytest.raises(ShardNotReady):
        await reborn.apply(0, last, [])
    status = await restored(reborn)
    assert status["ready"] and status["replayed"] > 0 and reborn.covered >= last
    assert reborn.state is not None
    assert 0 < len(reborn.state.users) < len(live.state.users)  # only those with events after the checkpoint
    for uxid in live.state.users:
        await reborn.user_counts(uxid)  # the others come from their checkpoints when asked for
        assert np.array_equal(reborn.state.counts_of(uxid), live.state.counts_of(uxid)), uxid
        assert reborn.state.users[uxid][SEEN_IDS] == live.state.users[uxid][SEEN_IDS]
    await reborn.stop()


@pytest.mark.parametrize("checkpoint_interval", [3600.0])  # only the explicit checkpoint below
async def test_a_checkpoint_taken_during_a_long_span_holds_exactly_what_it_says_it_covers(
    settings: Settings, js: JetStreamContext
) -> None:
    """A span is applied a chunk at a time, other work in between; a checkpoint in between must
    not write the chunks done with the sequence from before the span (a restore would apply
    them twice, and `mabrec verify` reports the checkpoint ahead of the recount)."""
    slot_map = await prepare(settings)
    shard = Shard(0, settings)
    await restored(shard)
    users = [u for u in (f"cut-{i}" for i in range(4_000)) if slot_map.shard_of(u) == 0]
    span = [(seq, 0, Event(users[seq % len(users)], CLICKED, (7,))) for seq in range(1, 4 * APPLY_CHUNK + 1)]
    # The stream must reach as far as the span (a shard refuses spans past its end): empty messages.
    await asyncio.gather(*(js.publish(settings.events_subject, b"[]") for _ in span))
    applying = asyncio.create_task(shard.apply(0, len(span), span))
    while shard.state is None or shard.state.applied == 0:
        await asyncio.sleep(0)  # until the first chunk is in: the span is half applied
    assert not applying.done()
    await shard.checkpoint()
    await applying
    async with short_lived_pool(settings.database_url or "", "test") as pool:
        store = StateStore(pool)
        covered = set((await covered_by_slot(pool, slot_map.slots_of(0))).values())
        rows = await store.load_users(users)
    clicks = sum(userstate.posterior(userstate.from_bytes(counts), 7)[0] - 1 for _, counts, _ in rows)
    assert len(covered) == 1 and clicks == sum(seq <= min(covered) for seq, _, _ in span) > 0
    await shard.stop()


@pytest.mark.parametrize("checkpoint_interval", [3600.0])  # only the explicit checkpoints below
@pytest.mark.parametrize("landed", [True, False], ids=["committed", "rolled-back"])
async def test_a_checkpoint_whose_commit_went_unanswered_adds_its_popularity_once(
    settings: Settings, js: JetStreamContext, monkeypatch: pytest.MonkeyPatch, landed: bool
) -> None:
    """A COMMIT can land and its answer be lost (a dropped connection, a cancelled checkpoint):
    the shard cannot tell, so the next checkpoint asks PostgreSQL. Giving the popularity back
    for the next one to add (the old way) counted it twice when the COMMIT had landed."""
    slot_map = await prepare(settings)
    shard = Shard(0, settings)
    await restored(shard)
    users = [u for u in (f"doubt-{i}" for i in range(400)) if slot_map.shard_of(u) == 0]
    span = [(seq, 0, Event(users[seq % len(users)], CLICKED, (7,))) for seq in range(1, 101)]
    await asyncio.gather(*(js.publish(settings.events_subject, b"[]") for _ in span))
    await shard.apply(0, len(span), span)

    next_commit_unanswered(monkeypatch, landed)
    with pytest.raises(psycopg.OperationalError):
        await shard.checkpoint()
    await shard.checkpoint()  # finds out whether the first one landed
    async with short_lived_pool(settings.database_url or "", "test") as pool:
        popularity = await StateStore(pool).popularity()
    clicks = dict(zip(popularity.keys.tolist(), popularity.clicks.tolist(), strict=True))
    assert clicks[7] == len(span)
    await shard.stop()


async def test_a_slate_waiting_while_its_slot_is_released_leaves_no_copy_of_the_user(
    settings: Settings, js: JetStreamContext
) -> None:
    """A slate request checks the user's slot, then waits for the apply lock to load them; if a
    release gives the slot away meanwhile, the user must not be loaded after it: that copy would
    stay in memory and, were the slot to come back, stand for the user without the events its
    other owner applied (found by `mabrec verify` after a live re-shard)."""
    slot_map = await prepare(settings)
    shard = Shard(0, settings)
    await restored(shard)
    assert shard.state is not None
    uxid = next(u for u in (f"away-{i}" for i in range(1_000)) if slot_map.shard_of(u) == 0)
    async with shard._apply_lock:  # a hand-off in progress: the release is queued first...
        releasing = asyncio.create_task(shard.release([slot_of(uxid)]))
        while not shard._checkpoint_lock.locked():
            await asyncio.sleep(0)
        asking = asyncio.create_task(shard.slates([(uxid, 5)]))  # ...then the slate
        await asyncio.sleep(0)  # one turn: the slate checks the slot and queues for the lock
        assert not asking.done()
    await releasing
    assert await asking == [None]  # the caller asks the new owner
    assert uxid not in shard.state.users
    assert await shard.user_counts(uxid) is None
    await shard.stop()


async def test_a_user_without_a_checkpoint_starts_empty_without_a_read_and_one_with_is_read(
    pipeline: Pipeline,
) -> None:
    """Once a shard has indexed its slots' checkpointed users, a user never seen gets a slate
    without a PostgreSQL read; a user with a checkpoint (written before the shard started, or by
    this shard since and then evicted) is still read, whole."""
    users = [u for u in (f"idx-{i}" for i in range(200)) if pipeline.slot_map.shard_of(u) == 0]
    before, new, later = users[:3]
    seq = await pipeline.publish({"event_type": "clicked", "entity_id": 2, "user_id": before})
    await pipeline.settle(seq, before)
    await pipeline.shards[0].checkpoint()
    reborn = Shard(0, pipeline.settings)  # a new incarnation: nothing in memory
    await restored(reborn)
    await wait_for(lambda: reborn.status()["slots_indexed"] == len(reborn.epochs) > 0)
    assert reborn.state is not None and before not in reborn.state.users
    loads = reborn.loads

    assert isinstance((await reborn.slates([(new, 5)]))[0], tuple)
    assert (reborn.reads_skipped, reborn.loads) == (1, loads)  # no read
    assert await reborn.user_counts(before) and posterior(reborn, before, 2) == (2, 1)
    assert reborn.loads == loads + 1  # read, from the checkpoint written before the restart

    # This shard's own checkpoint of a user it started empty (the router tells both incarnations).
    at = await pipeline.publish({"event_type": "clicked", "entity_id": 3, "user_id": later})
    await wait_for(lambda: reborn.covered >= at)
    assert reborn.reads_skipped == 2
    await reborn.checkpoint()
    reborn.state.resident_users = 0
    reborn.state.evict()
    assert later not in reborn.state.users
    await reborn.user_counts(later)
    assert posterior(reborn, later, 3) == (2, 1) and reborn.loads == loads + 2
    await reborn.stop()


async def test_a_shard_names_itself_and_its_slots(settings: Settings, js: JetStreamContext) -> None:
    """What Ray shows for the actor (its Repr column, its log lines' prefix)."""
    slot_map = await prepare(settings)
    shard = Shard(1, settings)
    assert repr(shard) == "Shard(1)"  # as Ray takes it, on creation
    await restored(shard)
    assert repr(shard) == f"Shard(1, slots {slot_ranges(slot_map.slots_of(1))})"
    await shard.stop()


async def test_an_acquire_catches_up_on_the_users_of_the_slots_it_takes_from_their_checkpoints(
    pipeline: Pipeline,
) -> None:
    """A slot whose checkpoint is behind its new owner is brought level by replaying the stream
    after it; the replay lands on the slot's users as their checkpoints hold them (loaded first),
    not on empty users: the user ends with every event, the checkpointed and the replayed."""
    taker, giver = pipeline.shards[0], pipeline.shards[1]
    uxid = next(u for u in (f"catch-{i}" for i in range(1_000)) if pipeline.slot_map.shard_of(u) == 1)
    slot = slot_of(uxid)
    for _ in range(3):
        seq = await pipeline.publish({"event_type": "clicked", "entity_id": 2, "user_id": uxid})
    await pipeline.settle(seq)
    await giver.checkpoint()  # the slot's checkpoint: 3 clicks
    await giver._unlisten()  # it hears no more (as if it died): the next events are only in the stream
    for _ in range(2):
        seq = await pipeline.publish({"event_type": "clicked", "entity_id": 2, "user_id": uxid})
    await wait_for(lambda: taker.covered >= seq)  # the taker is past them, the slot's checkpoint is not
    async with short_lived_pool(pipeline.settings.database_url or "", "test") as pool:
        await StateStore(pool).move_slots({slot: 0})
    await taker.acquire([slot])
    assert await taker.user_counts(uxid) is not None
    assert posterior(taker, uxid, 2) == (1 + 5, 1)


async def test_slates_learn_from_events(pipeline: Pipeline) -> None:
    seq = 0
    for movie in (3, 12, 18):  # three Christopher Nolan movies
        seq = await pipeline.publish({"event_type": "clicked", "entity_id": movie, "user_id": "nolan-fan"})
    await pipeline.settle(seq, "nolan-fan")
    shard = pipeline.shard_of("nolan-fan")
    cold = next(u for u in (f"cold-{i}" for i in range(100)) if pipeline.shard_of(u) is shard)
    # 100 slates each: fewer, and the spread of the draws says more than what was learned.
    answers = await shard.slates([("nolan-fan", 5)] * 100 + [(cold, 5)] * 100)
    slates = [picks[0] for picks in answers if isinstance(picks, tuple)]
    assert len(slates) == 200
    assert all(len(s) == 5 and len(set(s)) == 5 for s in slates)
    fan = sum(32 in s for s in slates[:100])  # The Prestige: the one Nolan movie left
    baseline = sum(32 in s for s in slates[100:])  # a user with no history, same shard
    assert clearly_more(fan, baseline, 100), (fan, baseline)
    assert not {3, 12, 18} & {m for s in slates[:100] for m in s}  # opened movies go to the back


async def test_the_api_reaches_shards_over_nats_request_reply(pipeline: Pipeline) -> None:
    seq = await pipeline.publish({"event_type": "clicked", "entity_id": 14, "user_id": "rpc-user"})
    await pipeline.settle(seq, "rpc-user")
    shard = pipeline.slot_map.shard_of("rpc-user")
    nc = await stream.connect(pipeline.settings.nats_url or "", "test-api")
    client = dataplane.ShardClient(nc, pipeline.settings.namespace)
    slates = [ids for ids, _ in await asyncio.gather(*(client.slate(shard, "rpc-user", 5) for _ in range(20)))]
    assert all(len(s) == 5 and 14 not in s for s in slates)  # concurrent requests, batched
    assert client.batchers[shard].calls < 20
    profile = await client.profile(shard, "rpc-user")
    assert [row[0] for row in profile.rows if row[0] > 0] == [14]
    assert profile.last_slate is not None and profile.last_slate[1] in slates  # why one looked as it did
    await pipeline.shards[shard].stop()  # no responder any more: fail fast, not after a timeout
    with pytest.raises(Unavailable, match="not serving"):  # NATS said so ("did not answer": a timeout)
        await client.slate(shard, "rpc-user", 5)
    await nc.close()


async def restarted(pipeline: Pipeline, index: int) -> Shard:
    """Shard `index` stopped (a final checkpoint) and replaced by a new one, its slots indexed:
    its users are in PostgreSQL only, and it knows which of them have a checkpoint."""
    await pipeline.shards[index].stop()
    shard = pipeline.shards[index] = Shard(index, pipeline.settings, seed=index)
    await restored(shard)
    await wait_for(lambda: shard.status()["slots_indexed"] == shard.status()["slots"])
    return shard


async def test_a_user_whose_state_cannot_be_read_holds_up_nobody_else(pipeline: Pipeline) -> None:
    """A PostgreSQL read held open (the checkpoint table locked by another session): the slate of
    the user whose checkpoint must be read fails alone after SLATE_READ_WAIT (the API answers it
    from popularity, and does not take the shard for down), while users in memory and new users
    get their personal slates over NATS all along; once the lock goes, that user is read and
    served. (Before, the read held the shard's apply lock and its one-at-a-time subscription:
    every other slate of the shard waited, then timed out.)"""
    index = pipeline.slot_map.shard_of("slow")
    resident = next(u for u in (f"resident-{i}" for i in range(100)) if pipeline.slot_map.shard_of(u) == index)
    users = {"slow": 3, resident: 12}
    seq = 0
    for uxid, movie in users.items():
        seq = await pipeline.publish({"event_type": "clicked", "entity_id": movie, "user_id": uxid})
    await pipeline.settle(seq)
    shard = await restarted(pipeline, index)
    nc = await stream.connect(pipeline.settings.nats_url or "", "test-api")
    client = dataplane.ShardClient(nc, pipeline.settings.namespace)
    await client.slate(index, resident, 5)  # read before the lock: in memory from here on
    assert shard.state is not None and resident in shard.state.users and "slow" not in shard.state.users
    async with await psycopg.AsyncConnection.connect(pipeline.settings.database_url or "") as locker:
        async with locker.transaction():
            await locker.execute("LOCK TABLE user_state IN ACCESS EXCLUSIVE MODE")
            slow = asyncio.create_task(client.slate(index, "slow", 5))
            others = [resident, *(f"new-{i}" for i in range(40) if pipeline.slot_map.shard_of(f"new-{i}") == index)]
            for uxid in others * 3:  # one after another: each its own request to the shard
                ids, reasons = await client.slate(index, uxid, 5)
                assert len(ids) == 5
            assert not slow.done() or isinstance(slow.exception(), NotThisOne)
            with pytest.raises(NotThisOne, match="still being read"):
                await slow  # the lock is held all along: it failed alone
    # The lock is gone: the read that was waiting goes through, and the user is served as they are.
    await wait_for(lambda: shard.state is not None and "slow" in shard.state.users)
    ids, _ = await client.slate(index, "slow", 5)
    assert posterior(shard, "slow", 3) == (2, 1) and 3 not in ids  # their click, and it goes last
    await nc.close()


async def test_a_slate_that_fails_fails_alone(pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug in one user's slate: that request's answer is its error; the batch's others are served."""
    shard = pipeline.shards[0]
    assert shard.state is not None
    real = type(shard.state).slate

    def buggy(state: Any, uxid: str, limit: int) -> Any:
        if uxid == "poison":
            raise ZeroDivisionError("a bug")
        return real(state, uxid, limit)

    monkeypatch.setattr(type(shard.state), "slate", buggy)
    users = [u for u in ("poison", *(f"fine-{i}" for i in range(30))) if slot_of(u) in shard.epochs]
    assert users[0] == "poison" or slot_of("poison") not in shard.epochs
    answers = await shard.slates([(u, 5) for u in users])
    for uxid, answer in zip(users, answers, strict=True):
        if uxid == "poison":
            assert isinstance(answer, dict) and "ZeroDivisionError" in answer["error"]
        else:
            assert isinstance(answer, tuple) and len(answer[0]) == 5


def failed_at_least(shard: Shard, times: int) -> bool:
    return shard.failures["apply:bug"] >= times


class LocalShardFleet:
    """`system.core.health.Actors` over the pipeline's plain shards: a restart is a new Shard."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.restarted: list[str] = []

    async def call(self, actor: str, method: str, *args: Any, timeout: float) -> Any:
        shard = self.pipeline.shards[int(actor.rsplit("-", 1)[1])]
        return await asyncio.wait_for(getattr(shard, method)(*args), timeout)

    def restart(self, actor: str) -> None:
        index = int(actor.rsplit("-", 1)[1])
        old = self.pipeline.shards[index]
        asyncio.get_running_loop().create_task(old.stop())  # a killed process: no more answers from it
        self.pipeline.shards[index] = Shard(index, self.pipeline.settings, seed=index + 10)
        self.restarted.append(actor)


async def test_a_bug_in_applying_one_users_event_breaks_the_shard_which_is_replaced(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An apply that raises on one user's event is not an outage: counted as a bug, and after
    three failures at the same position the shard says it is not ready (broken), so the health
    check replaces it; the replacement (the bug fixed meanwhile: a deploy) restores from the
    checkpoint and the log and applies everything, the poison event too, exactly once. (Before,
    the shard logged each failure and stayed ready, its users' learning stopped for good.)"""
    index = pipeline.slot_map.shard_of("poison")
    others = [u for u in (f"bystander-{i}" for i in range(50)) if pipeline.slot_map.shard_of(u) == index][:3]
    real = ShardState.apply

    def buggy(state: ShardState, events: Any, at: Any = 0) -> int:
        if any(e.user == "poison" for e in events):
            raise KeyError("a bug in applying poison's event")
        return real(state, events, at)

    monkeypatch.setattr(ShardState, "apply", buggy)
    seq = await pipeline.publish({"event_type": "clicked", "entity_id": 5, "user_id": "poison", "event_id": "p1"})
    shard = pipeline.shards[index]
    for k, uxid in enumerate(others):  # each span after it replays it, and fails again
        seq = await pipeline.publish({"event_type": "clicked", "entity_id": 7, "user_id": uxid, "event_id": f"b{k}"})
        await wait_for(functools.partial(failed_at_least, shard, k + 1))
    status = shard.status()
    assert status["broken"] and "KeyError" in status["broken"] and not status["ready"]
    assert shard.covered < seq  # stuck before the poison event: nothing after it applied either
    with pytest.raises(ShardNotReady, match="broken"):
        await shard.ensure_ready()
    # The health check: not ready three times in a row, then replaced.
    fleet = LocalShardFleet(pipeline)
    monitor = HealthMonitor(fleet, len(pipeline.shards), threshold=3, grace=0)
    for _ in range(3):
        await monitor.check()
    assert fleet.restarted == [shard_key(index)]
    monkeypatch.setattr(ShardState, "apply", real)  # fixed
    replacement = pipeline.shards[index]
    await restored(replacement)
    await wait_for(lambda: replacement.covered >= seq)
    assert posterior(replacement, "poison", 5) == (2, 1)
    assert all(posterior(replacement, uxid, 7) == (2, 1) for uxid in others)
    assert replacement.status()["ready"] and not replacement.status()["failures"]
