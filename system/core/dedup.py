"""A user's seen event ids: how a retry counts once (the rule is in system/core/events.py).

Ids are kept as 63-bit hashes with the stream second each was seen at, oldest first, for the
de-duplication window; a user's list is part of their state, checkpointed with their counts and
reproduced exactly by a recount, because it depends on the stream alone (its order and its
timestamps), never on the clock of the process that applies it.
"""

from __future__ import annotations

import bisect
import sys
from array import array

import numpy as np

# Past this many ids a linear scan costs more than a vectorized compare.
_SCAN = 64


class SeenIds:
    __slots__ = ("ids", "at")

    def __init__(self, ids: array[int] | None = None, at: array[int] | None = None) -> None:
        self.ids: array[int] = ids if ids is not None else array("Q")
        self.at: array[int] = at if at is not None else array("I")

    def __len__(self) -> int:
        return len(self.ids)

    def admit(self, digest: int, second: int, window: int, cap: int) -> bool:
        """Whether an event with this id hash, at this stream second, counts: False when the
        same id was seen `window` seconds ago or less. Remembers it when it counts."""
        if self.at and second < self.at[-1]:
            second = self.at[-1]  # a user's clock never goes back (a server's clock may)
        i = self._find(digest)
        if i >= 0:
            if second - self.at[i] <= window:
                return False
            del self.ids[i], self.at[i]  # seen long ago: it counts again, as seen now
        self.ids.append(digest)
        self.at.append(second)
        # Forget what left the window (a prefix: the list is in stream order), then the oldest
        # beyond the cap.
        gone = bisect.bisect_left(self.at, second - window)
        excess = max(len(self.ids) - gone - cap, 0)
        if gone + excess:
            del self.ids[: gone + excess], self.at[: gone + excess]
        return True

    def _find(self, digest: int) -> int:
        if len(self.ids) <= _SCAN:
            try:
                return self.ids.index(digest)
            except ValueError:
                return -1
        hits = np.flatnonzero(np.frombuffer(self.ids, dtype=np.uint64) == digest)
        return int(hits[0]) if len(hits) else -1

    def to_bytes(self) -> bytes:
        """The hashes (little-endian uint64) then the seconds (little-endian uint32)."""
        ids, at = self.ids, self.at
        if sys.byteorder == "big":
            ids, at = array("Q", ids), array("I", at)
            ids.byteswap()
            at.byteswap()
        return ids.tobytes() + at.tobytes()

    @classmethod
    def from_bytes(cls, raw: bytes) -> SeenIds:
        n = len(raw) // 12
        ids, at = array("Q", raw[: 8 * n]), array("I", raw[8 * n : 12 * n])
        if sys.byteorder == "big":
            ids.byteswap()
            at.byteswap()
        return cls(ids, at)
