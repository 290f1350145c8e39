from __future__ import annotations

import subprocess
import sys
import zlib

import numpy as np

from system.settings import SLOTS
from system.sharding import SlotMap, slot_of


def test_slot_is_a_stable_crc32_not_the_salted_hash() -> None:
    assert slot_of("alice") == zlib.crc32(b"alice") % SLOTS
    # A fresh interpreter (different hash salt) computes the same slot.
    out = subprocess.run(
        [sys.executable, "-c", "from system.sharding import slot_of; print(slot_of('alice'))"],
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
    before, after = SlotMap.even(2), SlotMap.even(4)
    for uxid in ("a", "b", "carol", "dave-42"):
        slot = slot_of(uxid)
        assert before.shard_of(uxid) == before.owners[slot] and after.shard_of(uxid) == after.owners[slot]
