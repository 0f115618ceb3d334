"""A model's three priority lanes: which to read next (aging), reading, and handing entries back.

Lane choice is age-based promotion. Each lane's score is its level (high 2, normal 1, low 0)
plus the age of its oldest undelivered entry divided by ``aging_s``; the pull reads from
lanes in score order. So a low request that has waited ``2 × aging_s`` longer than the
oldest high request outranks it: the extra wait of any lane is bounded and low never
starves, while fresh work still goes high → normal → low. The age comes from the entry id
(Redis server milliseconds at XADD), so clocks of producers and workers do not matter.

The choice and the reads happen in one Lua call (XREADGROUP without BLOCK is allowed in
scripts); only when every lane is empty does the worker block on a plain XREADGROUP.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, NamedTuple

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from producer.keys import GROUP, PRIORITIES, STREAM_FIELD, Keys
from producer.protocol import decode_envelope

log = logging.getLogger(__name__)

LEVELS: dict[str, int] = {"high": 2, "normal": 1, "low": 0}

# KEYS: lanes, highest first. ARGV: 1 group, 2 consumer, 3 count, 4 aging ms.
# Returns {missing, {lane index (1-based), entry id, {field, value, ...}}, ...};
# missing = 1 when a lane or its group does not exist (the worker re-creates groups).
PULL = """
local group, consumer = ARGV[1], ARGV[2]
local want, aging = tonumber(ARGV[3]), tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local missing = 0
local order = {}
for i, key in ipairs(KEYS) do
  local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', key)
  local last = nil
  if ok then
    for _, g in ipairs(groups) do
      for j = 1, #g, 2 do
        if g[j] == 'name' and g[j + 1] == group then
          for k = 1, #g, 2 do
            if g[k] == 'last-delivered-id' then last = g[k + 1] end
          end
        end
      end
    end
  end
  if last == nil then
    missing = 1
  else
    local nxt = redis.call('XRANGE', key, '(' .. last, '+', 'COUNT', 1)
    if #nxt > 0 then
      local ms = tonumber(string.match(nxt[1][1], '^(%d+)'))
      local level = #KEYS - i
      order[#order + 1] = {i, level + math.max(0, now - ms) / aging}
    end
  end
end
table.sort(order, function(a, b) return a[2] > b[2] end)
local out = {missing}
for _, lane in ipairs(order) do
  if want <= 0 then break end
  local res = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', want,
                         'STREAMS', KEYS[lane[1]], '>')
  if res then
    for _, e in ipairs(res[1][2]) do
      out[#out + 1] = {lane[1], e[1], e[2]}
      want = want - 1
    end
  end
end
return out
"""

# Hand an entry this worker holds back to the end of its lane (graceful shutdown):
# KEYS 1 lane, 2 final marker; ARGV 1 group, 2 entry id, 3 consumer, 4 field, 5 payload.
# Returns 1 requeued, 0 already answered (just acked), -1 not pending on this consumer
# (another worker claimed it: leave it alone).
REQUEUE = """
local mine = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1, ARGV[3])
if #mine == 0 then return -1 end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('XADD', KEYS[1], '*', ARGV[4], ARGV[5])
return 1
"""


class Entry(NamedTuple):
    """One request-stream entry delivered to this worker (a tuple: one per request)."""

    stream: str
    entry_id: str
    fields: dict[bytes, bytes]
    priority: str  # the lane's name
    delivery_count: int = 1

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
        self.streams = keys.request_lanes(model)
        self.priority_of = dict(zip(self.streams, PRIORITIES, strict=True))
        self._pull = redis.register_script(PULL)
        self._requeue = redis.register_script(REQUEUE)

    async def ensure_groups(self) -> None:
        """Create the group on every lane at id 0 (entries queued before any worker count)."""
        for stream in self.streams:
            try:
                await self.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
            except ResponseError as err:
                if "BUSYGROUP" not in str(err):
                    raise

    async def pull(self, count: int) -> list[Entry]:
        """Up to ``count`` new entries, lanes in aging order; never blocks."""
        if count <= 0:
            return []
        res = await self._pull(keys=self.streams, args=[GROUP, self.consumer, count, self.aging_ms])
        if int(res[0]) == 1:
            await self.ensure_groups()
        lanes = [(stream, self.priority_of[stream]) for stream in self.streams]
        out = []
        for lane_index, entry_id, flat in res[1:]:
            stream, priority = lanes[int(lane_index) - 1]
            out.append(Entry(stream, _s(entry_id), _fields(flat), priority))
        return out

    async def wait(self, block_ms: int) -> list[Entry]:
        """Block until any lane has a new entry (≤ one per lane is delivered), or time out."""
        try:
            res: Any = await self.redis.xreadgroup(
                GROUP, self.consumer, dict.fromkeys(self.streams, ">"), count=1, block=block_ms
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
            out += [e for e in self._entries(res) if e.fields]  # deleted ones have no fields
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
                final_key = self.keys.final(decode_envelope(payload).id)
            except Exception:  # undecodable: no request id; requeue it, intake dead-letters it
                final_key = self.keys.final("-")
            res = await self._requeue(
                keys=[e.stream, final_key],
                args=[GROUP, e.entry_id, self.consumer, STREAM_FIELD, payload],
            )
            n += int(res) == 1
        return n
