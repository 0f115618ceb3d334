"""The worker's two loops beside intake and the aggregator: heartbeat + reclaim, and cancels.

Both run on the host's one asyncio loop until ``closing()`` says so, and both ride out
Redis outages (a lost connection is logged and retried; a shutdown's cancel is not
swallowed).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from producer.contract.cancel import CANCEL_ID_FIELD, CANCEL_TOKEN_FIELD
from workers.aggregator import Aggregator
from workers.intake import Intake, being_cancelled
from workers.lanes import Entry, Lanes
from workers.metrics import Metrics
from workers.reclaim import ClaimedEntry, Reclaimer

log = logging.getLogger(__name__)

CANCEL_BLOCK_MS = 500  # also bounds how long a stopping worker waits for this loop
CANCEL_READ_COUNT = 512
RETRY_DELAY_S = 0.5
_CANCEL_ID = CANCEL_ID_FIELD.encode()
_CANCEL_TOKEN = CANCEL_TOKEN_FIELD.encode()


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def entry_from_claim(claim: ClaimedEntry, lanes: Lanes) -> Entry:
    """A claimed entry as intake takes it."""
    return Entry(
        claim.stream,
        claim.entry_id,
        dict(claim.fields),
        lanes.priority_of.get(claim.stream, claim.priority),
        delivery_count=claim.delivery_count,
    )


async def heartbeat_loop(
    reclaimer: Reclaimer,
    intake: Intake,
    metrics: Metrics,
    info: Callable[[], dict[str, Any]],
    interval_s: float,
    closing: Callable[[], bool],
    on_beat: Callable[[], None],
) -> None:
    """Beat every interval (also while draining; ``on_beat`` after each beat that landed);
    claim dead workers' entries while serving."""
    name, model = reclaimer.worker, intake.model
    while not closing():
        started = time.monotonic()
        try:
            await reclaimer.beat(info())
            on_beat()
            if not intake.stopping.is_set():
                claimed = await reclaimer.reclaim(model)
                if claimed:
                    entries = [entry_from_claim(c, intake.lanes) for c in claimed]
                    metrics.claimed += len(entries)
                    log.info("%s: claimed %d entries of dead workers", name, len(entries))
                    await intake.process(entries)
        except (RedisConnectionError, RedisTimeoutError) as err:
            if being_cancelled():
                raise asyncio.CancelledError from err
            log.warning("%s: heartbeat/reclaim failed (%s); retrying", name, err)
        await asyncio.sleep(max(0.0, interval_s - (time.monotonic() - started)))


async def cancel_loop(
    redis: Redis, cancel_stream: str, aggregator: Aggregator, intake: Intake,
    closing: Callable[[], bool],
) -> None:  # fmt: skip
    """Cancels of running requests: abort in the engine. Queued ones are skipped at intake."""
    last_id: Any = None
    while not closing():
        try:
            if last_id is None:  # only cancels from now on matter
                last = await redis.xrevrange(cancel_stream, count=1)
                last_id = last[0][0] if last else "0-0"
            res: Any = await redis.xread(
                {cancel_stream: last_id}, count=CANCEL_READ_COUNT, block=CANCEL_BLOCK_MS
            )
        except (RedisConnectionError, RedisTimeoutError) as err:
            if being_cancelled():
                raise asyncio.CancelledError from err
            log.warning("%s: cancel stream read failed (%s); retrying", aggregator.worker, err)
            await asyncio.sleep(RETRY_DELAY_S)
            continue
        any_hit = False
        for _, entries in res or []:
            for entry_id, fields in entries:
                last_id = entry_id
                rid, token = fields.get(_CANCEL_ID), fields.get(_CANCEL_TOKEN)
                if rid is None or token is None:
                    continue
                rid_s, token_s = _text(rid), _text(token)
                intake.note_cancel(rid_s, token_s)
                any_hit |= aggregator.cancel(rid_s, token_s)
        if any_hit:
            await aggregator.writer.flush()
