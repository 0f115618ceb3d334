"""A model's three priority lanes: which to read next (aging), reading, and handing entries back.

Lane choice is age-based promotion. Each lane's score is its level (high 2, normal 1, low 0)
plus the age of its oldest undelivered entry divided by ``aging_s``; the pull reads from
lanes in score order. So a low request that has waited ``2 × aging_s`` longer than the
oldest high request outranks it: the extra wait of any lane is bounded and low never
starves, while fresh work still goes high → normal → low. The age comes from the entry id
(Redis server milliseconds at XADD), so clocks of producers and workers do not matter.

The choice and the reads happen in one Lua call (PULL, ``producer/contract/lua/pull.lua``);
only when every lane is empty does the worker block on a plain XREADGROUP.

A queue split into partitions (``Keys.partitions``; one Redis Cluster slot each) has the
three lanes in every partition, and one PULL reads one partition. A pull of ``n`` entries
gives each partition an equal share (the first one a rotating start, so none is always
last), then what some left unused to the others in the same order: priorities and aging
hold within each partition, and as request ids spread evenly over the partitions each holds
the same mix. Waiting blocks on every partition at once (one XREADGROUP per partition; an
answer that comes after the wait returned is taken by the next pull or wait).
"""

from __future__ import annotations

import asyncio
import logging
import time
from asyncio import FIRST_COMPLETED
from typing import Any, NamedTuple

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from producer.contract.codec import decode_envelope
from producer.contract.finalize import charged_cost, requeue_call
from producer.contract.keys import GROUP, PRIORITIES, RESUME_FIELD, STREAM_FIELD, Keys
from producer.contract.scripts import PULL, REQUEUE

log = logging.getLogger(__name__)

LEVELS: dict[str, int] = {"high": 2, "normal": 1, "low": 0}
_RESUME = RESUME_FIELD.encode()


class Entry(NamedTuple):
    """One request-stream entry delivered to this worker (a tuple: one per request)."""

    stream: str
    entry_id: str
    fields: dict[bytes, bytes]
    priority: str  # the lane's name
    delivery_count: int = 1

    @property
    def cost_tokens(self) -> int:
        """The backlog cost ENQUEUE charged for this entry (given back when it is acked)."""
        return charged_cost(self.fields)

    @property
    def redelivered(self) -> bool:
        """Delivered before (claimed, taken back, or requeued): its request may have a
        half-finished answer to resume."""
        return self.delivery_count > 1 or _RESUME in self.fields

    @property
    def enqueued_ms(self) -> int:
        return int(self.entry_id.split("-", 1)[0])

    def level(self, aging_s: float, now_ms: int | None = None) -> int:
        """Lane level promoted by one per ``aging_s`` waited (engine priority 0..2)."""
        now = time.time_ns() // 1_000_000 if now_ms is None else now_ms
        waited_s = max(0, now - self.enqueued_ms) / 1000.0
        return min(2, LEVELS[self.priority] + int(waited_s / aging_s))


def _s(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def _fields(flat: Any) -> dict[bytes, bytes]:
    if type(flat) is list and len(flat) == 2:  # the usual entry: one field ``m``
        k, v = flat
        if type(k) is bytes and type(v) is bytes:
            return {k: v}
    if isinstance(flat, dict):
        return {
            k if isinstance(k, bytes) else str(k).encode(): v
            if isinstance(v, bytes)
            else str(v).encode()
            for k, v in flat.items()
        }
    items = list(flat or [])
    return {
        items[i] if isinstance(items[i], bytes) else str(items[i]).encode(): items[i + 1]
        if isinstance(items[i + 1], bytes)
        else str(items[i + 1]).encode()
        for i in range(0, len(items) - 1, 2)
    }


class Lanes:
    """Reads one model's lanes for one consumer (a thin layer over redis.asyncio)."""

    def __init__(
        self, redis: Redis, keys: Keys, model: str, consumer: str, *, aging_s: float
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.model = model
        self.consumer = consumer
        self.aging_ms = max(1, int(aging_s * 1000))
        self.partitions = [keys.request_lanes(model, p) for p in keys.all_partitions()]
        self.streams = [stream for lanes in self.partitions for stream in lanes]
        self.priority_of = {
            stream: priority
            for lanes in self.partitions
            for stream, priority in zip(lanes, PRIORITIES, strict=True)
        }
        self._pull = redis.register_script(PULL)
        self._requeue = redis.register_script(REQUEUE)
        self._next_first = 0  # the partition a pull serves first (rotates)
        self._waits: dict[int, asyncio.Future[list[Entry]]] = {}  # partition → its XREADGROUP

    async def ensure_groups(self) -> None:
        """Create the group on every lane at id 0 (entries queued before any worker count)."""
        for stream in self.streams:
            try:
                await self.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
            except ResponseError as err:
                if "BUSYGROUP" not in str(err):
                    raise

    async def pull(self, count: int) -> list[Entry]:
        """Up to ``count`` new entries, lanes in aging order, partitions fairly (module doc);
        never blocks. Entries a finished wait brought come first."""
        out = self._harvest()
        want = count - len(out)
        if want <= 0:
            return out
        n = len(self.partitions)
        order = [(self._next_first + i) % n for i in range(n)]
        self._next_first = (self._next_first + 1) % n
        shares = [want // n + (i < want % n) for i in range(n)]
        got = await asyncio.gather(
            *(self._pull_one(p, k) for p, k in zip(order, shares, strict=True))
        )
        for part in got:
            out += part
        left = count - len(out)
        # What partitions with less work left unused goes to those that filled their share
        # (or had none: a count smaller than the partitions).
        for p, share, part in zip(order, shares, got, strict=True):
            if left <= 0:
                break
            if len(part) >= share:
                more = await self._pull_one(p, left)
                out += more
                left -= len(more)
        return out

    async def _pull_one(self, partition: int, count: int) -> list[Entry]:
        """PULL from one partition's lanes."""
        if count <= 0:
            return []
        streams = self.partitions[partition]
        res = await self._pull(keys=streams, args=[GROUP, self.consumer, count, self.aging_ms])
        if int(res[0]) == 1:
            await self.ensure_groups()
        out = []
        for lane_index, entry_id, flat in res[1:]:
            stream = streams[int(lane_index) - 1]
            out.append(Entry(stream, _s(entry_id), _fields(flat), self.priority_of[stream]))
        return out

    async def wait(self, block_ms: int) -> list[Entry]:
        """Block until any lane has a new entry (≤ one per lane is delivered), or time out."""
        if len(self.partitions) == 1:
            return await self._wait_one(0, block_ms)
        for p in range(len(self.partitions)):
            if p not in self._waits:
                self._waits[p] = asyncio.ensure_future(self._wait_one(p, block_ms))
        await asyncio.wait(
            list(self._waits.values()), timeout=block_ms / 1000, return_when=FIRST_COMPLETED
        )
        return self._harvest()

    def _harvest(self) -> list[Entry]:
        """The entries of the partitions' waits that have ended (raising what one raised)."""
        out: list[Entry] = []
        for p, task in list(self._waits.items()):
            if task.done():
                del self._waits[p]
                out += task.result()
        return out

    async def close(self) -> None:
        """Stop the waits in flight (an entry one was delivered stays pending on this
        consumer: reconcile or a peer's reclaim takes it up)."""
        for task in self._waits.values():
            task.cancel()
        await asyncio.gather(*self._waits.values(), return_exceptions=True)
        self._waits.clear()

    async def _wait_one(self, partition: int, block_ms: int) -> list[Entry]:
        streams = self.partitions[partition]
        try:
            res: Any = await self.redis.xreadgroup(
                GROUP, self.consumer, dict.fromkeys(streams, ">"), count=1, block=block_ms
            )
        except ResponseError as err:
            # NOGROUP, or UNBLOCKED: the stream was deleted while we waited (FLUSHALL, DEL).
            log.warning("lane read failed (%s); re-creating the consumer groups", err)
            await asyncio.sleep(0.05)
            await self.ensure_groups()
            return []
        return self._entries(res)

    async def delivered(self, count: int = 1000) -> list[Entry]:
        """Entries pending on this consumer (after a lost reply: delivered but never seen)."""
        out: list[Entry] = []
        for stream in self.streams:
            try:
                res: Any = await self.redis.xreadgroup(
                    GROUP, self.consumer, {stream: "0"}, count=count
                )
            except ResponseError:
                continue
            # Deleted ones have no fields. Re-reading the pending list delivers again (the
            # count went up): marked so, intake looks for a half-finished answer to resume.
            out += [e._replace(delivery_count=2) for e in self._entries(res) if e.fields]
        return out

    async def stale(self, min_idle_ms: int, held: set[tuple[str, str]]) -> list[Entry]:
        """Entries pending on this consumer, idle at least ``min_idle_ms``, that are not in
        ``held`` (lane, entry id): claimed again (XCLAIM to itself: the delivery count goes
        up, so one that keeps failing still ends as a dead letter) for intake to re-handle.
        The idle bound spares entries on their way in (a pull whose reply is not processed
        yet) and is atomic: one touched meanwhile is not claimed."""
        out: list[Entry] = []
        for stream in self.streams:
            try:
                rows = await self.redis.xpending_range(
                    stream, GROUP, "-", "+", 1000, consumername=self.consumer, idle=min_idle_ms
                )
            except ResponseError:
                continue  # no lane or group (yet): nothing pending
            counts = {_s(r["message_id"]): int(r["times_delivered"]) for r in rows}
            ids: list[Any] = [i for i in counts if (stream, i) not in held]
            if not ids:
                continue
            claimed: Any = await self.redis.xclaim(stream, GROUP, self.consumer, min_idle_ms, ids)
            priority = self.priority_of[stream]
            for entry_id, flat in claimed or []:
                if flat:  # an entry deleted from the stream has no fields: nothing to do
                    eid = _s(entry_id)
                    out.append(Entry(stream, eid, _fields(flat), priority, counts[eid] + 1))
        return out

    def _entries(self, res: Any) -> list[Entry]:
        out = []
        for stream, entries in res or []:
            name = _s(stream)
            for entry_id, flat in entries:
                out.append(Entry(name, _s(entry_id), _fields(flat), self.priority_of[name]))
        return out

    async def requeue(self, entries: list[Entry]) -> int:
        """Hand ``entries`` back to the end of their lanes; returns how many were requeued."""
        n = 0
        for e in entries:
            payload = e.fields.get(STREAM_FIELD.encode(), b"")
            try:
                request_id = decode_envelope(payload).id
            except Exception:  # undecodable: no request id; requeue it, intake dead-letters it
                request_id = "-"
            keys, args = requeue_call(
                self.keys, self.model, request_id, e.stream, e.entry_id, self.consumer, payload,
                e.cost_tokens,
            )  # fmt: skip
            res = await self._requeue(keys=keys, args=args)
            n += int(res) == 1
        return n
