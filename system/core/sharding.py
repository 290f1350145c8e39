"""User -> slot -> shard. Users hash to a fixed number of slots with a stable hash (crc32, never
Python's salted `hash`); a slot map assigns slots to shards, so re-sharding moves slots, not users."""

from __future__ import annotations

import zlib
from collections.abc import Iterable

import numpy as np

# Users hash to a fixed number of slots; slots (never users) move between shards.
SLOTS = 1024


def slot_of(uxid: str) -> int:
    return zlib.crc32(uxid.encode()) % SLOTS


def slot_ranges(slots: Iterable[int]) -> str:
    """Slots as ranges, for people: [0, 1, 2, 7, 9, 10] -> "0-2,7,9-10"."""
    runs: list[list[int]] = []
    for slot in sorted(slots):
        if runs and slot == runs[-1][1] + 1:
            runs[-1][1] = slot
        else:
            runs.append([slot, slot])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs) or "none"


def even_slot_map(shards: int) -> np.ndarray:
    """Contiguous, balanced ranges of slots per shard: slot s -> s * shards // SLOTS."""
    return (np.arange(SLOTS, dtype=np.int64) * shards // SLOTS).astype(np.int16)


class SlotMap:
    """Which shard owns each slot. Immutable; a re-shard builds a new one."""

    def __init__(self, owners: np.ndarray) -> None:
        if owners.shape != (SLOTS,):
            raise ValueError(f"a slot map has {SLOTS} entries, got {owners.shape}")
        self.owners = owners.astype(np.int16, copy=True)
        self.owners.flags.writeable = False
        self.shards = int(self.owners.max()) + 1

    @classmethod
    def even(cls, shards: int) -> SlotMap:
        return cls(even_slot_map(shards))

    def shard_of(self, uxid: str) -> int:
        return int(self.owners[slot_of(uxid)])

    def slots_of(self, shard: int) -> list[int]:
        return np.flatnonzero(self.owners == shard).tolist()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SlotMap) and bool(np.array_equal(self.owners, other.owners))

    def __hash__(self) -> int:
        return hash(self.owners.tobytes())
