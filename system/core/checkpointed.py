"""Which users have a checkpoint in PostgreSQL, as far as a shard can tell without asking.

A user not in memory is read from PostgreSQL before the shard touches them; most such users in
a growing service are new, and have nothing to read. This index lets the shard skip the read for
them: it answers "maybe" (read) or "no" (nothing there: start empty), and never "no" for a user
who has a checkpoint. That holds because a slot counts as indexed only once every checkpoint of
its users that could exist is in the index:
- its users' ids were read from PostgreSQL after the shard took the slot (a checkpoint from an
  earlier owner then is either committed and read, or refused: slots are fenced by epoch);
- since then only this shard writes the slot's checkpoints, and it adds a cut's users before
  writing it (`add`);
- a slot given up is indexed no more (`forget`): when it comes back, others may have written it.
Users are kept as 64-bit hashes of their ids (Python's str hash, stable within the process): a
collision only costs a read that finds nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from system.core.sharding import slot_of

# Recent additions are kept in a set and merged into the sorted array past this many.
MERGE_AFTER = 50_000


class CheckpointedUsers:
    def __init__(self) -> None:
        self.indexed: set[int] = set()  # slots whose checkpointed users are all in the index
        self._generation: dict[int, int] = {}  # per slot, bumped when it is given up
        self._sorted = np.zeros(0, dtype=np.int64)
        self._recent: set[int] = set()

    def __len__(self) -> int:
        return len(self._sorted) + len(self._recent)

    def generations(self, slots: Iterable[int]) -> dict[int, int]:
        """Take these before reading the slots' users: `add_slots` marks a slot indexed only if
        it was not given up meanwhile."""
        return {slot: self._generation.get(slot, 0) for slot in slots}

    def add_slots(self, uxids: Iterable[str], generations: dict[int, int]) -> None:
        """The users with a checkpoint in these slots, read after the slots were taken."""
        self.add(uxids)
        self.indexed.update(s for s, g in generations.items() if self._generation.get(s, 0) == g)

    def add(self, uxids: Iterable[str]) -> None:
        """Users whose checkpoint is being written (called before the write)."""
        self._recent.update(map(hash, uxids))
        if len(self._recent) > MERGE_AFTER:
            merged = np.concatenate([self._sorted, np.fromiter(self._recent, dtype=np.int64, count=len(self._recent))])
            self._sorted = np.unique(merged)
            self._recent = set()

    def forget(self, slots: Iterable[int]) -> None:
        """These slots were given up: their users' checkpoints may change under another owner."""
        for slot in slots:
            self.indexed.discard(slot)
            self._generation[slot] = self._generation.get(slot, 0) + 1

    def may_have(self, uxids: Sequence[str]) -> list[bool]:
        """Per user: False only if they have no checkpoint (their slot is indexed and they are not in it)."""
        if not uxids:
            return []
        hashes = np.fromiter(map(hash, uxids), dtype=np.int64, count=len(uxids))
        found = np.zeros(len(uxids), dtype=bool)
        if len(self._sorted):
            pos = np.minimum(np.searchsorted(self._sorted, hashes), len(self._sorted) - 1)
            found = self._sorted[pos] == hashes
        recent, indexed = self._recent, self.indexed
        return [
            bool(hit) or h in recent or slot_of(u) not in indexed
            for u, h, hit in zip(uxids, hashes.tolist(), found.tolist(), strict=True)
        ]
