"""Where slots go when the number of shards changes, or one shard is emptied for a restart."""

from __future__ import annotations

import numpy as np
import pytest

from system.core.limits import MAX_SHARDS
from system.core.placement import default_shards, evacuated, moves, rebalanced
from system.core.sharding import SLOTS, SlotMap


@pytest.mark.parametrize(("before", "after"), [(4, 8), (8, 3), (3, 1), (1, 5), (4, 4), (7, 6)])
def test_a_rebalance_is_balanced_and_moves_only_what_it_must(before: int, after: int) -> None:
    current = SlotMap.even(before)
    target = rebalanced(current, after)
    counts = np.bincount(target.owners, minlength=after)
    assert len(counts) == after and counts.max() - counts.min() <= 1 and counts.sum() == SLOTS
    # The fewest moves a balanced map allows: every slot stays unless its shard is gone or over
    # its share, and then goes where there is room.
    share = SLOTS // after
    must_move = sum(max(int(np.sum(current.owners == s)) - (share + 1 if s < SLOTS % after else share), 0)
                    for s in range(after)) + int(np.sum(current.owners >= after))  # fmt: skip
    assert len(moves(current, target)) == must_move
    assert all(dst < after for _, dst in moves(current, target).values())


def test_rebalancing_an_uneven_map_only_evens_it_out() -> None:
    owners = np.zeros(SLOTS, dtype=np.int16)
    owners[:10] = 1  # shard 1 has 10 slots, shard 0 the rest
    target = rebalanced(SlotMap(owners), 2)
    assert np.bincount(target.owners).tolist() == [512, 512]
    assert (target.owners[:10] == 1).all()  # shard 1 kept what it had


def test_an_evacuated_shard_has_no_slot_and_the_others_share_its_own() -> None:
    current = SlotMap.even(4)
    empty = evacuated(current, 2)
    assert not (empty.owners == 2).any()
    gained = np.bincount(empty.owners, minlength=4) - np.bincount(current.owners, minlength=4)
    assert gained[2] == -256 and sorted(gained[[0, 1, 3]].tolist()) == [85, 85, 86]
    assert set(moves(current, empty)) == set(current.slots_of(2))
    assert moves(empty, current) == {s: (dst, src) for s, (src, dst) in moves(current, empty).items()}
    with pytest.raises(ValueError):
        evacuated(SlotMap.even(1), 0)


def test_the_default_shard_count_is_one_per_cpu_within_bounds() -> None:
    assert [default_shards(cpus) for cpus in (0.0, 0.5, 1.0, 2.0, 7.9, 16.0, 10_000.0)] == [
        1,
        1,
        1,
        2,
        7,
        16,
        MAX_SHARDS,
    ]
