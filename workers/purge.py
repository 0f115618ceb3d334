"""``chatq purge``: empty a model's stranded queue (its lanes' queued entries).

Only entries no worker was given yet go (PURGE, one lane at a time, in pages); entries a
worker holds stay and are answered. Each purged request's requester gets a ``cancelled``
error result, so nobody waits for an answer that will never come. An entry added without
ENQUEUE (its id's reservation names another entry, or none) is dropped without telling the
id's requester, who may be someone whose id was copied.
"""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from producer.contract.codec import decode_envelope
from producer.contract.codes import ErrorCode
from producer.contract.keys import GROUP, PRIORITIES, RESULT_TTL_S, Keys
from producer.contract.results import Error, result_body
from producer.contract.scripts import FINALIZE, PURGE
from producer.errors import ProtocolError

PURGE_PAGE = 500  # entries one PURGE call drops (bounds one script's run time)
PURGED_MESSAGE = "purged from the queue by an operator (chatq purge)"


@dataclass(frozen=True)
class LaneCount:
    """A lane's queued (never delivered) and pending (held by a worker) entries."""

    priority: str
    queued: int
    pending: int


async def lane_counts(redis: Redis, keys: Keys, model: str, lanes: list[str]) -> list[LaneCount]:
    """What a purge of ``lanes`` (priorities) of ``model`` would drop, and what it leaves."""
    out: list[LaneCount] = []
    for priority in lanes:  # summed over the partitions
        queued = pending_all = 0
        for p in keys.all_partitions():
            stream = keys.requests(model, priority, p)
            length = await redis.xlen(stream)
            try:
                pending = int((await redis.xpending(stream, GROUP))["pending"])
            except ResponseError:  # no group yet: nothing delivered
                pending = 0
            queued += max(length - pending, 0)
            pending_all += pending
        out.append(LaneCount(priority, queued, pending_all))
    return out


@dataclass(frozen=True)
class Purged:
    """What a purge dropped: queued requests (their requesters told) and entries added
    without ENQUEUE (nobody told)."""

    requests: int
    strays: int


async def purge(redis: Redis, keys: Keys, model: str, lanes: list[str]) -> Purged:
    """Drop the queued entries of ``model``'s ``lanes``."""
    drop = redis.register_script(PURGE)
    finalize = redis.register_script(FINALIZE)
    requests = strays = 0
    for priority, p in [(prio, p) for prio in lanes for p in keys.all_partitions()]:
        stream = keys.requests(model, priority, p)
        while True:
            reply = await drop(keys=[stream, keys.backlog(model, p)], args=[GROUP, PURGE_PAGE])
            rows = list(zip(reply[::3], reply[1::3], reply[2::3], strict=True))
            for entry_id, payload, reserved in rows:
                if int(reserved):
                    await _tell_requester(finalize, keys, stream, model, entry_id, payload)
                    requests += 1
                else:
                    strays += 1
            if len(rows) < PURGE_PAGE:
                break
    return Purged(requests, strays)


async def _tell_requester(
    finalize: object, keys: Keys, stream: str, model: str, entry_id: bytes, payload: bytes
) -> None:
    """A ``cancelled`` final for a purged request (FINALIZE: written only if none exists;
    its XACK finds nothing pending, so no backlog is given back twice)."""
    try:
        request_id = decode_envelope(payload).id
    except ProtocolError:  # unreadable: nobody to tell
        return
    body = result_body(Error(ErrorCode.CANCELLED.value, PURGED_MESSAGE))
    await finalize(  # type: ignore[operator]
        keys=[
            keys.result(request_id),
            keys.final(request_id),
            stream,
            keys.backlog(model, keys.partition_in(stream)),
        ],
        args=[GROUP, entry_id, "error", body, RESULT_TTL_S, 0],
    )


def parse_lanes(lane: str | None) -> list[str]:
    return list(PRIORITIES) if lane is None else [lane]
