"""Where slots should go: balanced slot maps that move as few slots as possible.

A re-shard from N to M shards gives every shard SLOTS/M slots (one more for the first few when
it does not divide), keeping each slot where it is whenever its shard is still there and not
over its share. A rolling restart empties one shard onto the others, then gives it back exactly
what it had.
"""

from __future__ import annotations

import numpy as np

from system.core.limits import MAX_SHARDS
from system.core.sharding import SLOTS, SlotMap


def default_shards(cpus: float) -> int:
    """The shard count of a first start when none is asked for: one per CPU of the cluster.
    A shard is one Python process, so it uses one core at most, and more shards than cores only
    add processes that compete for them, with smaller batches per shard (BENCHMARKS.md, slates by
    shard count: on 2 cores, 1 and 2 shards serve about as many, 4 and 8 fewer, at more CPU)."""
    return max(1, min(int(cpus), MAX_SHARDS))


def rebalanced(current: SlotMap, shards: int) -> SlotMap:
    """A balanced map over `shards` shards that keeps as many slots in place as it can."""
    if shards < 1:
        raise ValueError("at least one shard")
    quota = np.full(shards, SLOTS // shards)
    quota[: SLOTS % shards] += 1
    owners = current.owners.astype(np.int64)
    new = np.full(SLOTS, -1, dtype=np.int64)
    kept = np.zeros(shards, dtype=np.int64)
    for slot in range(SLOTS):  # keep what fits, in slot order
        shard = owners[slot]
        if shard < shards and kept[shard] < quota[shard]:
            new[slot] = shard
            kept[shard] += 1
    room = np.repeat(np.arange(shards), quota - kept)  # the free places, shard by shard
    new[new < 0] = room
    return SlotMap(new.astype(np.int16))


def evacuated(current: SlotMap, shard: int) -> SlotMap:
    """The map with `shard`'s slots spread over the other shards (each gets about as many)."""
    owners = current.owners.astype(np.int64)
    leaving = np.flatnonzero(owners == shard)
    others = [s for s in range(current.shards) if s != shard]
    if not others:
        raise ValueError("the only shard cannot be emptied")
    new = owners.copy()
    new[leaving] = np.resize(np.asarray(others), len(leaving))
    return SlotMap(new.astype(np.int16))


def moves(current: SlotMap, target: SlotMap) -> dict[int, tuple[int, int]]:
    """slot -> (from shard, to shard), for every slot that changes hands."""
    changed = np.flatnonzero(current.owners != target.owners)
    return {int(s): (int(current.owners[s]), int(target.owners[s])) for s in changed}
