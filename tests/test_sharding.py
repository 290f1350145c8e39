from __future__ import annotations

import subprocess
import sys
import zlib

import numpy as np

from system.core.sharding import SLOTS, SlotMap, slot_of, slot_ranges


def test_slot_is_a_stable_crc32_not_the_salted_hash() -> None:
    assert slot_of("alice") == zlib.crc32(b"alice") % SLOTS
    # A fresh interpreter (different hash salt) computes the same slot.
    out = subprocess.run(
        [sys.executable, "-c", "from system.core.sharding import slot_of; print(slot_of('alice'))"],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "123", "PYTHONPATH": "."},
    )
    assert int(out.stdout) == slot_of("alice")


def test_even_map_is_balanced_and_contiguous() -> None:
    m = SlotMap.even(3)
    counts = np.bincount(m.owners)
    assert m.shards == 3 and counts.max() - counts.min() <= 1
    assert (np.diff(m.owners) >= 0).all()
    assert sorted(m.slots_of(0) + m.slots_of(1) + m.slots_of(2)) == list(range(SLOTS))


def test_users_spread_over_shards() -> None:
    m = SlotMap.even(4)
    counts = np.bincount([m.shard_of(f"user-{i}") for i in range(20_000)], minlength=4)
    assert counts.min() > 4_500  # ~5,000 each


def test_resharding_moves_slots_not_users() -> None:
    """Any new slot map moves a user exactly when it moves the user's slot: users of one slot
    always stay together, so a slot's checkpoint moves as one piece."""
    users = [f"user-{i}" for i in range(5_000)]
    before = SlotMap.even(2)
    rng = np.random.default_rng(0)
    for after in (SlotMap.even(4), SlotMap.even(3), SlotMap(rng.integers(0, 5, SLOTS).astype(np.int16))):
        moved_slots = set(np.flatnonzero(before.owners != after.owners).tolist())
        moved_users = {u for u in users if before.shard_of(u) != after.shard_of(u)}
        assert moved_users == {u for u in users if slot_of(u) in moved_slots}
        by_slot: dict[int, set[int]] = {}
        for u in users:
            by_slot.setdefault(slot_of(u), set()).add(after.shard_of(u))
        assert all(len(shards) == 1 for shards in by_slot.values())


def test_slots_read_as_ranges() -> None:
    assert slot_ranges([9, 0, 1, 2, 7, 10]) == "0-2,7,9-10"
    assert slot_ranges(SlotMap.even(2).slots_of(1)) == "512-1023"
    assert slot_ranges([5]) == "5" and slot_ranges([]) == "none"
