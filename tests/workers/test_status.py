"""status_report against a real Redis with queued, pending and dead work."""

from __future__ import annotations

import time
from typing import Any

from producer import ChatClient
from producer.contract.codec import make_envelope
from producer.contract.keys import GROUP, Keys
from tests.producer.test_client import expected_cost
from workers.reclaim import Reclaimer
from workers.status import render_rich, render_text, status_report

KEYS = Keys()
MESSAGES = [{"role": "user", "content": "When does my refund arrive?"}]


async def test_status_report_counts_queue_pending_dead_and_workers(
    redis_url: str, redis_client: Any
) -> None:
    assert await status_report(redis_client, KEYS) == []
    async with ChatClient(redis_url) as client:
        for priority, n in (("high", 1), ("normal", 3), ("low", 2)):
            for _ in range(n):
                await client.submit(MESSAGES, model="alpha", max_tokens=10, priority=priority)
        await client.submit(MESSAGES, model="beta", max_tokens=10)
    cost = expected_cost(make_envelope(MESSAGES, model="alpha"))
    cost += 10 - 256  # max_tokens=10 instead of the default 256
    normal = KEYS.requests("alpha", "normal")
    await redis_client.xgroup_create(normal, GROUP, id="0")
    # A live worker holds two normal requests; a dead consumer (no heartbeat) holds one.
    w1 = Reclaimer(redis_client, KEYS, "w1")
    beat_began = time.monotonic()
    await w1.beat({"model": "alpha", "free_tokens": 100})
    await redis_client.xreadgroup(GROUP, "w1", {normal: ">"}, count=2)
    await redis_client.xreadgroup(GROUP, "w-dead", {normal: ">"}, count=1)
    # A worker that announced beta but has not read yet; dead letters counted per model.
    await Reclaimer(redis_client, KEYS, "w2").beat({"model": "beta"})
    await redis_client.hincrby(KEYS.backlog("alpha"), "dead", 2)
    await redis_client.hset(KEYS.backlog("alpha"), "rate", "123.4")

    alpha, beta = await status_report(redis_client, KEYS)
    since_beat_ms = (time.monotonic() - beat_began) * 1000
    assert alpha.model == "alpha" and beta.model == "beta"
    assert [(lane.priority, lane.length, lane.pending, lane.queued) for lane in alpha.lanes] == [
        ("high", 1, 0, 1),
        ("normal", 3, 3, 0),
        ("low", 2, 0, 2),
    ]
    assert alpha.queued_requests == 3 and alpha.pending == 3
    assert alpha.backlog_requests == 6 and alpha.backlog_tokens == 6 * cost
    assert alpha.drain_rate_tps == 123.4 and alpha.dead_letters == 2
    assert [w.name for w in alpha.workers] == ["w1"]  # w-dead has no heartbeat
    (worker,) = alpha.workers
    assert worker.capacity == {"model": "alpha", "free_tokens": 100} and worker.pid
    # The beat's age at the report, at most the time since the beat began (the host's clock;
    # +2 ms for the whole-ms rounding of both ends).
    assert worker.beat_age_ms is not None and 0 <= worker.beat_age_ms <= since_beat_ms + 2
    assert beta.queued_requests == 1 and [w.name for w in beta.workers] == ["w2"]

    text = render_text([alpha, beta])
    lines = text.splitlines()
    assert lines[0].split()[0] == "model" and len(lines) == 4
    assert lines[2].split()[:7] == ["alpha", "3", "1/0/2", "3", str(6 * cost), "123", "2"]
    assert "1 (w1)" in lines[2] and "1 (w2)" in lines[3]
    assert render_rich([alpha, beta]).row_count == 2
    assert render_text([]) == "no requests queued yet"
