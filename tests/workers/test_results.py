"""The result writer against a real Redis: fenced writes, resends, and Redis outages."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from producer.contract.codec import encode_envelope, make_envelope
from producer.contract.keys import GROUP, STREAM_FIELD, Keys
from producer.contract.results import Chunk, Done, chunk_body, decode_result
from producer.contract.scripts import CHUNKS, FINALIZE_MANY
from workers.lanes import Entry
from workers.redis_server import RedisServer
from workers.results import ResultWriter

KEYS = Keys()
MODEL = "m"
LANE = KEYS.requests(MODEL, "normal")


async def _pending(redis: Any, n: int, consumer: str = "w1") -> list[Entry]:
    """``n`` entries (requests r0..) pending on ``consumer``."""
    await redis.xgroup_create(LANE, GROUP, id="0", mkstream=True)
    for i in range(n):
        env = make_envelope([{"role": "user", "content": "hi"}], model=MODEL, request_id=f"r{i}")
        await redis.xadd(LANE, {STREAM_FIELD: encode_envelope(env)})
    res = await redis.xreadgroup(GROUP, consumer, {LANE: ">"}, count=n)
    return [Entry(LANE, eid.decode(), fields, "normal") for eid, fields in res[0][1]]


async def _results(redis: Any, request_id: str) -> list[Any]:
    return [decode_result(f) for _, f in await redis.xrange(KEYS.result(request_id))]


async def test_writes_for_an_entry_another_worker_took_over_are_fenced(redis_client: Any) -> None:
    """A worker paused past its heartbeat wakes up: its entry is now pending on the worker
    that claimed it, so neither its next chunk nor its final lands, and it is told to drop
    the request; the entry stays with the claimer."""
    e0, e1 = await _pending(redis_client, 2)
    writer = ResultWriter(redis_client, KEYS, MODEL, "w1")
    dropped: list[str] = []
    writer.on_fenced = dropped.extend
    writer.chunk(e0, "r0", "Hel", [1, 2])
    writer.chunk(e1, "r1", "Hi", [3])
    assert await writer.flush()
    await redis_client.xclaim(LANE, GROUP, "w2", 0, [e0.entry_id])  # w2 took r0 over
    writer.chunk(e0, "r0", "lo", [4])
    writer.final(e0, "r0", Done("Hello", "stop"))
    writer.final(e1, "r1", Done("Hi", "stop"))
    assert await writer.flush()
    assert dropped == ["r0"] and writer.chunks_fenced == 1
    assert writer.finals_fenced == 1 and writer.finals_written == 1
    assert await _results(redis_client, "r0") == [Chunk(0, "Hel", (1, 2))]
    assert await _results(redis_client, "r1") == [Chunk(0, "Hi", (3,)), Done("Hi", "stop")]
    rows = await redis_client.xpending_range(LANE, GROUP, "-", "+", 10)
    assert [(r["message_id"].decode(), r["consumer"]) for r in rows] == [(e0.entry_id, b"w2")]


async def test_a_chunk_sent_again_after_a_lost_reply_is_not_appended_twice(
    redis_client: Any,
) -> None:
    (e0,) = await _pending(redis_client, 1)
    script = redis_client.register_script(CHUNKS)
    keys = [KEYS.result("r0"), LANE]
    for index, delta in ((0, "a"), (0, "a"), (1, "b"), (0, "a"), (1, "b")):
        args = [GROUP, "w1", e0.entry_id, index, chunk_body(index, delta, [index]), 60]
        assert await script(keys=keys, args=args) == [1]
    assert await _results(redis_client, "r0") == [Chunk(0, "a", (0,)), Chunk(1, "b", (1,))]


async def test_chunks_redis_refuses_are_kept_not_dropped(redis_client: Any) -> None:
    """Redis out of memory refuses the CHUNKS call whole: the chunks stay queued as they
    were (a dropped one would leave a gap) and land once Redis takes writes again."""
    (e0,) = await _pending(redis_client, 1)
    writer = ResultWriter(redis_client, KEYS, MODEL, "w1")
    await redis_client.config_set("maxmemory", 1)
    try:
        writer.chunk(e0, "r0", "a", [1])
        assert await writer.flush()  # Redis answered (with an error), so no outage
        assert writer.failing and writer.pending == 1
        writer.chunk(e0, "r0", "b", [2])
    finally:
        await redis_client.config_set("maxmemory", 0)
    writer._retry_at_s = 0.0
    assert await writer.flush() and writer.pending == 0
    assert await _results(redis_client, "r0") == [Chunk(0, "a", (1,)), Chunk(1, "b", (2,))]


async def test_a_chunk_is_appended_only_right_behind_its_predecessor(redis_client: Any) -> None:
    """CHUNKS refuses a chunk one past the next index (-2, nothing written): appended, it
    would make its predecessor "there already" for good."""
    (e0,) = await _pending(redis_client, 1)
    script = redis_client.register_script(CHUNKS)
    keys = [KEYS.result("r0"), LANE]

    async def send(index: int, delta: str) -> int:
        args = [GROUP, "w1", e0.entry_id, index, chunk_body(index, delta, [index]), 60]
        (reply,) = await script(keys=keys, args=args)
        return int(reply)

    assert await send(1, "b") == -2
    assert await _results(redis_client, "r0") == []
    assert [await send(0, "a"), await send(2, "c"), await send(1, "b")] == [1, -2, 1]
    assert await _results(redis_client, "r0") == [Chunk(0, "a", (0,)), Chunk(1, "b", (1,))]


async def test_a_final_never_lands_before_the_chunks_it_ends(redis_client: Any) -> None:
    """After a Redis restart the scripts are gone, and other processes load them while this
    writer's pipeline runs: its CHUNKS call fails with NOSCRIPT, the FINALIZE_MANY behind it
    finds its script loaded. The final is refused (its last chunk is not there), so the
    resend lands the chunk and then the final: the stream ends with its whole text."""
    (e0,) = await _pending(redis_client, 1)
    writer = ResultWriter(redis_client, KEYS, MODEL, "w1")
    writer.chunk(e0, "r0", "one ", [1])
    assert await writer.flush()
    await redis_client.script_flush()
    await redis_client.script_load(FINALIZE_MANY)  # another worker got this far
    writer.chunk(e0, "r0", "two", [2])
    writer.final(e0, "r0", Done("one two", "stop"))
    assert await writer.flush() and writer.pending == 0
    assert await _results(redis_client, "r0") == [
        Chunk(0, "one ", (1,)),
        Chunk(1, "two", (2,)),
        Done("one two", "stop"),
    ]
    assert writer.finals_written == 1


async def test_a_refused_chunk_holds_back_the_chunks_and_final_behind_it(
    redis_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Of a flush's two CHUNKS calls for one request, Redis refuses the first whole (here a
    script it does not have) and the second's chunk is refused as out of order; the final
    behind them is refused too. All three are kept, and land in order on the next flush."""
    monkeypatch.setattr("workers.results.MAX_CHUNKS_PER_CALL", 1)
    (e0,) = await _pending(redis_client, 1)
    writer = ResultWriter(redis_client, KEYS, MODEL, "w1")
    writer.chunk(e0, "r0", "a", [1])
    writer._sealed = writer._take().chunks  # chunk 0, sealed by a flush that failed
    writer.chunk(e0, "r0", "b", [2])
    writer.final(e0, "r0", Done("ab", "stop"))
    sent = writer._take()
    assert [c.index for c in sent.chunks] == [0, 1]
    for script in (writer._chunks_script, writer._finalize_many):
        await redis_client.script_load(script.script)
    pipe = redis_client.pipeline(transaction=False)
    pipe.execute_command("EVALSHA", "0" * 40, 0)  # chunk 0's call, refused whole
    calls = [writer.chunks_call(sent.chunks[1:]), *sent.finals.calls()]
    scripts = [writer._chunks_script, writer._finalize_many]
    for (keys, args), script in zip(calls, scripts, strict=True):
        pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
    replies = await pipe.execute(raise_on_error=False)
    assert replies[1:] == [[-2], [3]]
    writer._settle(sent, replies)
    assert await _results(redis_client, "r0") == []
    assert writer.pending == 3 and writer.failing
    writer._retry_at_s = 0.0
    assert await writer.flush() and writer.pending == 0
    assert await _results(redis_client, "r0") == [
        Chunk(0, "a", (1,)),
        Chunk(1, "b", (2,)),
        Done("ab", "stop"),
    ]


async def test_a_stream_that_lost_chunks_drops_its_request_for_a_resume(
    redis_client: Any,
) -> None:
    """Redis restarted from older data lost a request's chunks while its worker holds it:
    neither its next chunk nor its final lands (no gap, no final without its text), the
    request is dropped, and its entry stays pending on the worker, for reconcile to resume
    it from the chunks that are left."""
    (e0,) = await _pending(redis_client, 1)
    writer = ResultWriter(redis_client, KEYS, MODEL, "w1")
    dropped: list[str] = []
    writer.on_fenced = dropped.extend
    writer.chunk(e0, "r0", "one ", [1])
    writer.chunk(e0, "r0", "two ", [2])  # joins chunk 0
    assert await writer.flush()
    writer.chunk(e0, "r0", "three ", [3])
    assert await writer.flush()
    await redis_client.delete(KEYS.result("r0"))  # its chunks 0 and 1 are lost
    writer.chunk(e0, "r0", "four", [4])
    writer.final(e0, "r0", Done("one two three four", "stop"))
    assert await writer.flush() and writer.pending == 0
    assert dropped == ["r0"] and writer.finals_written == 0
    assert await _results(redis_client, "r0") == []
    rows = await redis_client.xpending_range(LANE, GROUP, "-", "+", 10)
    assert [(r["message_id"].decode(), r["consumer"]) for r in rows] == [(e0.entry_id, b"w1")]
    assert writer.held_entries() == set()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A server of this test's own (it is killed and restarted), AOF fsynced per write."""
    with RedisServer(appendfsync="always") as server:
        yield server


async def test_writes_wait_out_an_outage_in_bounded_memory(own_redis: RedisServer) -> None:
    """Redis is killed with chunks and a final queued: flushes report the failure instead of
    raising; a chunk a failed flush took keeps its index and text (that flush might have
    landed it), later deltas join one open chunk per request while the backoff runs; once
    Redis is back everything lands once, in order, chunk indexes without a gap."""
    redis = aioredis.Redis.from_url(own_redis.url, socket_timeout=1, retry_on_timeout=False)
    try:
        e0, e1 = await _pending(redis, 2)
        writer = ResultWriter(redis, KEYS, MODEL, "w1")
        writer.chunk(e0, "r0", "one ", [1])
        assert await writer.flush()
        own_redis.kill()
        writer.chunk(e0, "r0", "two ", [2])
        assert not await writer.flush()  # took "two " as chunk 1
        assert writer.failing and writer.retry_in_s() is not None
        writer._retry_at_s = float("inf")  # the backoff holds (its length is not under test)
        for i in range(50):  # a long answer generated while Redis is away
            writer.chunk(e0, "r0", "x", [i])
            writer.chunk(e1, "r1", "y", [i])
            assert not await writer.flush()
        writer.final(e1, "r1", Done("y" * 50, "length"))
        assert writer.pending == 4  # chunk 1, one open chunk each, one final: not 102 writes
        own_redis.restart()
        writer._retry_at_s = 0.0
        assert await writer.flush()
        assert not writer.failing and writer.pending == 0
        writer.chunk(e0, "r0", "three", [99])
        assert await writer.flush()
        r0 = await _results(redis, "r0")
        assert r0 == [
            Chunk(0, "one ", (1,)),
            Chunk(1, "two ", (2,)),
            Chunk(2, "x" * 50, tuple(range(50))),
            Chunk(3, "three", (99,)),
        ]
        assert await _results(redis, "r1") == [
            Chunk(0, "y" * 50, tuple(range(50))),
            Done("y" * 50, "length"),
        ]
    finally:
        await redis.aclose()
