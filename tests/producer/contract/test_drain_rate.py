"""FINALIZE's drain rate (the backlog hash's ``rate``) appears once there is traffic: also
when answers take longer than 5 s each while work waits (a CPU worker), but a gap with
nothing queued is not averaged in. Times are Redis's clock; the sleeps clear the 5 s idle
cutoff of ``finalize_lib.lua`` by a margin."""

from __future__ import annotations

import asyncio
from typing import Any

from producer import ChatClient
from producer.contract.keys import Keys
from producer.contract.results import Done, Timings, Usage
from tests.producer.test_client import MESSAGES, MODEL, FakeWorkerSide

KEYS = Keys()
IDLE_CUTOFF_S = 5.0  # finalize_lib.lua: a window over this long after an empty backlog restarts
DONE = Done("ok", "stop", Usage(3, 1), "w1", Timings(1.0, 2.0, 3.0))


async def _rate(redis_client: Any) -> bytes | None:
    value: bytes | None = await redis_client.hget(KEYS.backlog(MODEL), "rate")
    return value


async def test_slow_answers_while_work_waits_give_a_rate(redis_url: str, redis_client: Any) -> None:
    worker = FakeWorkerSide(redis_url)
    async with ChatClient(redis_url) as client:
        for _ in range(3):
            await client.submit(MESSAGES, model=MODEL, max_tokens=100)
    entry_id, env = worker.take()
    worker.final(entry_id, env, DONE)  # opens the window; two requests still wait
    await asyncio.sleep(IDLE_CUTOFF_S + 0.5)  # one slow answer
    entry_id, env = worker.take()
    worker.final(entry_id, env, DONE)
    rate = await _rate(redis_client)
    assert rate is not None and 0 < float(rate) < 1000


async def test_an_idle_gap_is_not_averaged_in(redis_url: str, redis_client: Any) -> None:
    worker = FakeWorkerSide(redis_url)
    async with ChatClient(redis_url) as client:
        await client.submit(MESSAGES, model=MODEL, max_tokens=100)
        entry_id, env = worker.take()
        worker.final(entry_id, env, DONE)  # the backlog is empty again
        await asyncio.sleep(IDLE_CUTOFF_S + 0.5)  # nothing queued meanwhile
        await client.submit(MESSAGES, model=MODEL, max_tokens=100)
        entry_id, env = worker.take()
        worker.final(entry_id, env, DONE)
    assert await _rate(redis_client) is None
