"""The data plane between the API, the event router and the shards: plain NATS, JSON only.

Ray places, supervises and restarts the actors (the control plane); the per-request traffic
goes over NATS, whose messages cost a fraction of the CPU of a Ray actor call (BENCHMARKS.md).
Two kinds of messages:
- `<ns>.shard.<i>.rpc`: request-reply; a batch of slate requests, or a profile request, for shard i.
- `<ns>.shard.<i>.apply`: from the router, the shard's events of a stream span (prev, last].
  Fire and forget: a lost message is a gap the shard notices on the next one and replays from
  the stream (see actors/shard.py), so this needs no acknowledgement.
JSON, never pickle: anyone who can publish on the NATS server must not be able to run code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError
from nats.errors import NoRespondersError

from system.batching import Batchers
from system.core.errors import Moved, NotThisOne, Unavailable
from system.core.events import Event
from system.core.policy import Picks
from system.core.profile import UserProfile


def rpc_subject(namespace: str, shard: int) -> str:
    return f"{namespace}.shard.{shard}.rpc"


def apply_subject(namespace: str, shard: int) -> str:
    return f"{namespace}.shard.{shard}.apply"


def encode_apply(prev_seq: int, last_seq: int, events: Sequence[tuple[int, int, Event]]) -> bytes:
    """A span: the shard's events of stream span (prev_seq, last_seq], each with its stream
    sequence and stream second."""
    rows = [[seq, second, e.user, e.kind, e.movies, e.event_id, e.ts] for seq, second, e in events]
    return orjson.dumps([prev_seq, last_seq, rows])


# A span's encoding stays well under NATS's default payload limit (1 MB): a busy stream's span
# is cut in several.
SPAN_BYTES = 256 * 1024


def split_span(
    prev_seq: int, last_seq: int, events: Sequence[tuple[int, int, Event]], max_bytes: int = SPAN_BYTES
) -> list[tuple[int, int, list[tuple[int, int, Event]]]]:
    """The span (prev_seq, last_seq] as consecutive spans small enough to send, cut only between
    stream messages (a message's events stay together: a span covers whole messages)."""
    spans: list[tuple[int, int, list[tuple[int, int, Event]]]] = []
    chunk: list[tuple[int, int, Event]] = []
    start, size = prev_seq, 0
    for item in events:
        seq, _, event = item
        cost = 64 + len(event.user) + 12 * len(event.movies) + len(event.event_id or "")
        if chunk and size + cost > max_bytes and seq != chunk[-1][0]:
            spans.append((start, chunk[-1][0], chunk))
            start, chunk, size = chunk[-1][0], [], 0
        chunk.append(item)
        size += cost
    spans.append((start, last_seq, chunk))
    return spans


def decode_apply(payload: bytes) -> tuple[int, int, list[tuple[int, int, Event]]]:
    prev_seq, last_seq, rows = orjson.loads(payload)
    return (
        prev_seq,
        last_seq,
        [
            (seq, second, Event(user, kind, tuple(movies), eid, None, ts))
            for seq, second, user, kind, movies, eid, ts in rows
        ],
    )


def encode_call(op: str, args: Any) -> bytes:
    return orjson.dumps([op, args])


def decode_call(payload: bytes) -> tuple[str, Any]:
    op, args = orjson.loads(payload)
    return op, args


def encode_reply(result: Any = None, error: str | None = None) -> bytes:
    return orjson.dumps({"error": error} if error is not None else {"result": result})


def decode_reply(payload: bytes) -> Any:
    """The result, or ValueError with the shard's error."""
    reply = orjson.loads(payload)
    if "error" in reply:
        raise ValueError(reply["error"])
    return reply["result"]


# The operations of `<ns>.shard.<i>.rpc`.
SLATES = "slates"  # args: [[uxid, limit], ...] -> per request: [movie ids, reasons], null (not the shard's), or {"error": why}
PROFILE = "profile"  # args: uxid -> {"rows", "last_slate"} (system/core/profile.py), or null
ERASE = "erase"  # args: uxid -> the erasure (actors/shard.py `erase`), or null


def picked(answer: Any, shard: int, uxid: str) -> Picks:
    """A shard's answer to one slate request of a batch: the picks; Moved (null: the user's slot
    is not the shard's), NotThisOne (that request failed alone)."""
    if isinstance(owned(answer, shard, uxid), dict):
        raise NotThisOne(f"shard {shard}: {answer.get('error')}")
    ids, reasons = answer
    return ids, reasons


def owned(answer: Any, shard: int, uxid: str) -> Any:
    """A shard's answer about a user; null means the user's slot is not (or no longer) its."""
    if answer is None:
        raise Moved(f"the slot of {uxid!r} is not shard {shard}'s")
    return answer


class ShardClient:
    """The API's side of `<ns>.shard.<i>.rpc`: concurrent slate requests to one shard share one
    NATS request (system/batching.py), answered by the shard's reply."""

    def __init__(
        self, nc: NATS, namespace: str, *, timeout: float = 2.0, linger: float = 0.0, in_flight: int = 2
    ) -> None:
        self.nc = nc
        self.namespace = namespace
        self.timeout = timeout
        self.batchers: Batchers[int, tuple[str, int], Any] = Batchers(
            lambda shard, requests: self.call(shard, SLATES, list(requests)), linger=linger, max_in_flight=in_flight
        )

    @property
    def connected(self) -> bool:
        return bool(self.nc.is_connected)

    async def slate(self, shard: int, uxid: str, limit: int) -> Picks:
        return picked(await self.batchers.submit(shard, (uxid, limit)), shard, uxid)

    async def profile(self, shard: int, uxid: str) -> UserProfile:
        return UserProfile.from_wire(owned(await self.call(shard, PROFILE, uxid), shard, uxid))

    async def erase(self, shard: int, uxid: str) -> dict[str, Any]:
        erased: dict[str, Any] = owned(await self.call(shard, ERASE, uxid), shard, uxid)
        return erased

    async def call(self, shard: int, op: str, args: Any) -> Any:
        try:
            msg = await self.nc.request(rpc_subject(self.namespace, shard), encode_call(op, args), timeout=self.timeout)
            return decode_reply(msg.data)
        except NoRespondersError:
            raise Unavailable(f"shard {shard} is not serving (restarting?)") from None
        except (NatsError, TimeoutError) as exc:
            raise Unavailable(f"shard {shard} did not answer: {exc!r}") from None
        except ValueError as exc:
            raise Unavailable(f"shard {shard} failed: {exc}") from None
