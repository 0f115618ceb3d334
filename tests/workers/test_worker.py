"""A real worker (engine process, tiny checkpoint, real tokenizer) behind a real Redis."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgpack
import pytest

from producer.client import ChatClient
from producer.errors import RequestFailed
from producer.keys import GROUP, STREAM_FIELD, Keys
from producer.protocol import (
    Envelope,
    Message,
    Params,
    decode_result,
    encode_envelope,
    make_envelope,
    now_unix_ms,
)
from tests.workers.conftest import MODEL, ThreadWorker

KEYS = Keys()
USER = [{"role": "user", "content": "Where is my order?"}]


async def _finals(redis: Any, request_id: str) -> list[Any]:
    entries = await redis.xrange(KEYS.result(request_id))
    results = [decode_result(fields) for _, fields in entries]
    return [r for r in results if type(r).__name__ in ("Done", "Error")]


async def _xadd(redis: Any, payload: bytes, priority: str = "normal") -> None:
    await redis.xadd(KEYS.requests(MODEL, priority), {STREAM_FIELD: payload})


async def _lanes_drained(redis: Any, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        sizes = [await redis.xlen(lane) for lane in KEYS.request_lanes(MODEL)]
        if sum(sizes) == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"lanes not drained: {sizes}")


async def test_chat_round_trip(
    tiny_worker: ThreadWorker, redis_url: str, redis_client: Any
) -> None:
    async with ChatClient(redis_url) as client:
        res = await client.chat(USER, model=MODEL, max_tokens=8, temperature=0, timeout_s=30)
    assert res.worker == "tw"
    assert res.finish_reason in ("stop", "length")
    assert 0 < res.usage.completion_tokens <= 8
    assert res.usage.prompt_tokens > 5
    assert 0 <= res.queued_ms <= res.first_token_ms <= res.total_ms < 30_000
    assert len(await _finals(redis_client, res.id)) == 1
    await _lanes_drained(redis_client)  # FINALIZE acked and deleted the entry


async def test_streaming_deltas_join_to_the_final_text(
    tiny_worker: ThreadWorker, redis_url: str
) -> None:
    async with ChatClient(redis_url) as client:
        rid = await client.submit(
            USER, model=MODEL, max_tokens=24, temperature=1.0, seed=3, stream=True, ignore_eos=True
        )
        deltas = [d async for d in client.stream(rid, timeout_s=30)]
        res = await client.result(rid, timeout_s=5)
    assert len(deltas) > 1
    assert "".join(deltas) == res.text
    assert res.usage.completion_tokens == 24 and res.finish_reason == "length"


async def test_stop_string_cuts_the_answer(tiny_worker: ThreadWorker, redis_url: str) -> None:
    async with ChatClient(redis_url) as client:
        kw: dict[str, Any] = {
            "model": MODEL,
            "max_tokens": 32,
            "temperature": 0,
            "ignore_eos": True,
        }
        full = await client.chat(USER, timeout_s=30, **kw)
        text = full.text
        # A stop string from the middle of the greedy answer: the rerun must end before it.
        stop = next(
            text[i : i + 3]
            for i in range(len(text) // 3, len(text) - 3)
            if text[i : i + 3].strip() and text.find(text[i : i + 3]) == i
        )
        cut = await client.chat(USER, timeout_s=30, stop=[stop], stream=True, **kw)
    assert cut.text == text[: text.index(stop)]
    assert cut.finish_reason == "stop"
    assert cut.usage.completion_tokens < full.usage.completion_tokens


async def test_malformed_and_oversize_payloads_get_errors_and_worker_keeps_serving(
    tiny_worker: ThreadWorker, redis_url: str, redis_client: Any
) -> None:
    good = make_envelope(USER, model=MODEL, request_id="good-1").to_wire()
    bad_field = {**good, "id": "bad-field", "params": {"max_tokens": -5}}
    unknown_version = {**good, "id": "bad-version", "v": 99}
    huge_content = {
        **good,
        "id": "huge-content",
        "messages": [{"role": "user", "content": "x" * 250_000}],
    }
    huge_payload = {
        **good,
        "id": "huge-payload",
        "messages": [{"role": "user", "content": "y" * 150_000}] * 8,
    }
    await _xadd(redis_client, b"\xc1 not msgpack at all")
    await _xadd(redis_client, msgpack.packb([1, 2, 3]))
    await _xadd(redis_client, msgpack.packb(bad_field))
    await _xadd(redis_client, msgpack.packb(unknown_version))
    await _xadd(redis_client, msgpack.packb(huge_content))
    await _xadd(redis_client, msgpack.packb(huge_payload))  # > 1 MiB: over the payload limit
    async with ChatClient(redis_url) as client:
        for rid, code in [
            ("bad-field", "invalid_request"),
            ("bad-version", "unsupported_version"),
            ("huge-content", "payload_too_large"),
            ("huge-payload", "payload_too_large"),
        ]:
            with pytest.raises(RequestFailed) as info:
                await client.result(rid, timeout_s=20)
            assert info.value.code == code, rid
        # Entries without a readable id cannot be answered: dead letters, acked.
        await _lanes_drained(redis_client)
        dead = await redis_client.xrange(KEYS.dead)
        assert len(dead) == 2
        assert all(b"undecodable" in fields[b"reason"] for _, fields in dead)
        res = await client.chat(USER, model=MODEL, max_tokens=4, timeout_s=30)
    assert res.usage.completion_tokens > 0
    assert tiny_worker.worker.engine is not None and tiny_worker.worker.engine.alive


async def test_prompt_larger_than_the_kv_cache_is_refused(
    tiny_worker: ThreadWorker, redis_url: str
) -> None:
    long_chat = [{"role": "user", "content": "refund order delivery " * 900}]
    async with ChatClient(redis_url) as client:
        with pytest.raises(RequestFailed) as info:
            await client.chat(long_chat, model=MODEL, max_tokens=8, timeout_s=30)
        assert info.value.code == "prompt_too_long"
        assert (await client.chat(USER, model=MODEL, max_tokens=2, timeout_s=30)).text is not None


async def test_expired_deadline_is_dropped_at_intake(
    tiny_worker: ThreadWorker, redis_url: str, redis_client: Any
) -> None:
    env = Envelope(
        id="late-1",
        model=MODEL,
        messages=(Message("user", "hi"),),
        created_ms=now_unix_ms() - 5000,
        deadline_ms=now_unix_ms() - 1000,
    )
    await _xadd(redis_client, encode_envelope(env))
    async with ChatClient(redis_url) as client:
        with pytest.raises(RequestFailed) as info:
            await client.result("late-1", timeout_s=20)
    assert info.value.code == "deadline_exceeded"
    await _lanes_drained(redis_client)


async def test_deadline_during_generation_returns_the_partial_answer(
    tiny_worker: ThreadWorker, redis_url: str
) -> None:
    async with ChatClient(redis_url) as client:
        res = await client.chat(
            USER, model=MODEL, max_tokens=1500, ignore_eos=True, deadline_s=0.5, timeout_s=30
        )
    assert res.finish_reason == "deadline"
    assert res.usage.completion_tokens < 1500
    assert res.total_ms < 5000


async def test_cancel_of_a_queued_request_skips_it(
    tiny_worker: ThreadWorker, redis_url: str, redis_client: Any
) -> None:
    env = make_envelope(USER, model=MODEL, request_id="cancel-queued", params=Params(max_tokens=8))
    async with ChatClient(redis_url) as client:
        assert await client.cancel("cancel-queued")  # marker first, then it reaches the lane
        await _xadd(redis_client, encode_envelope(env))
        with pytest.raises(RequestFailed) as info:
            await client.result("cancel-queued", timeout_s=20)
    assert info.value.code == "cancelled"
    assert len(await _finals(redis_client, "cancel-queued")) == 1


async def test_cancel_of_a_running_request_aborts_it_in_the_engine(
    tiny_worker: ThreadWorker, redis_url: str, redis_client: Any
) -> None:
    async with ChatClient(redis_url) as client:
        rid = await client.submit(USER, model=MODEL, max_tokens=1500, ignore_eos=True, stream=True)
        stream = client.stream(rid, timeout_s=30)
        await stream.__anext__()  # it is running: a first delta arrived
        t0 = time.monotonic()
        assert await client.cancel(rid)
        with pytest.raises(RequestFailed) as info:
            await client.result(rid, timeout_s=20)
        took_s = time.monotonic() - t0
    assert info.value.code == "cancelled"
    assert took_s < 5
    # The engine freed the request's KV blocks: all of the cache is free again.
    deadline = time.monotonic() + 5
    while tiny_worker.capacity.running_seqs or (
        tiny_worker.capacity.free_kv_tokens < tiny_worker.capacity.total_kv_tokens
    ):
        assert time.monotonic() < deadline, tiny_worker.capacity
        await asyncio.sleep(0.05)
    assert len(await _finals(redis_client, rid)) == 1


async def test_high_priority_overtakes_queued_low_priority(
    tiny_worker: ThreadWorker, redis_url: str
) -> None:
    """The worker holds 4 requests at most. With 4 long ones running, 4 low and then 4 high
    requests queue in Redis; when the long ones are cancelled, the high ones go first."""
    async with ChatClient(redis_url) as client:
        blockers = [
            await client.submit(USER, model=MODEL, max_tokens=1500, ignore_eos=True, stream=True)
            for _ in range(4)
        ]
        for rid in blockers:  # all four are running
            await client.stream(rid, timeout_s=30).__anext__()
        submitted: dict[str, float] = {}
        for prio in ("low", "high"):
            for _ in range(4):
                rid = await client.submit(
                    USER, model=MODEL, max_tokens=4, ignore_eos=True, priority=prio
                )
                submitted[rid] = time.time() * 1000
        for rid in blockers:
            await client.cancel(rid)
        started = {
            rid: submitted[rid] + (await client.result(rid, timeout_s=60)).queued_ms
            for rid in submitted
        }
    lows, highs = list(submitted)[:4], list(submitted)[4:]
    order = [
        ("low" if r in lows else "high", round(started[r]))
        for r in sorted(started, key=lambda r: started[r])
    ]
    assert max(started[r] for r in highs) <= min(started[r] for r in lows) + 2, order


async def test_poison_entry_goes_to_dead_letters_after_max_deliveries(
    tiny_worker: ThreadWorker, redis_url: str, redis_client: Any
) -> None:
    """An entry that already went down with 3 workers (delivered 3 times) is not run a 4th
    time: the live worker dead-letters it and the requester gets ``dead_letter``."""
    lane = KEYS.requests(MODEL, "normal")
    ghosts = ["ghost-1", "ghost-2", "ghost-3"]
    for g in ghosts:  # alive while the deliveries are staged, so nobody claims early
        await redis_client.set(KEYS.heartbeat(g), "{}", px=60_000)
    try:
        await redis_client.xgroup_create(lane, GROUP, id="0", mkstream=True)
    except Exception as err:  # the worker may have created it already
        assert "BUSYGROUP" in str(err)
    env = make_envelope(USER, model=MODEL, request_id="poison-1")
    # XADD and the first delivery in one transaction: the worker's blocked read cannot win.
    pipe = redis_client.pipeline(transaction=True)
    pipe.xadd(lane, {STREAM_FIELD: encode_envelope(env)})
    pipe.xreadgroup(GROUP, "ghost-1", {lane: ">"}, count=1)
    entry_id, delivered = await pipe.execute()
    assert delivered and delivered[0][1][0][0] == entry_id
    for g in ghosts[1:]:  # two more workers took it over and died
        await redis_client.xclaim(lane, GROUP, g, 0, [entry_id])
    info = await redis_client.xpending_range(lane, GROUP, "-", "+", 10)
    assert [(p["consumer"], p["times_delivered"]) for p in info] == [(b"ghost-3", 3)]
    await redis_client.delete(*[KEYS.heartbeat(g) for g in ghosts])
    async with ChatClient(redis_url) as client:
        with pytest.raises(RequestFailed) as failed:
            await client.result("poison-1", timeout_s=20)
        assert failed.value.code == "dead_letter"
        dead = await redis_client.xrange(KEYS.dead)
        assert [fields[b"id"] for _, fields in dead] == [b"poison-1"]
        assert len(await _finals(redis_client, "poison-1")) == 1
        await _lanes_drained(redis_client)
        # ...and the worker goes on serving.
        assert (await client.chat(USER, model=MODEL, max_tokens=2, timeout_s=30)).worker == "tw"


async def test_same_request_queued_twice_is_answered_once_and_both_entries_acked(
    tiny_worker: ThreadWorker, redis_url: str, redis_client: Any
) -> None:
    env = make_envelope(USER, model=MODEL, request_id="twice-1", params=Params(max_tokens=30))
    pipe = redis_client.pipeline(transaction=True)
    for _ in range(2):
        pipe.xadd(KEYS.requests(MODEL, "normal"), {STREAM_FIELD: encode_envelope(env)})
    await pipe.execute()
    async with ChatClient(redis_url) as client:
        res = await client.result("twice-1", timeout_s=30)
    assert res.usage.completion_tokens > 0
    await _lanes_drained(redis_client)
    assert len(await _finals(redis_client, "twice-1")) == 1
    assert (await redis_client.xpending(KEYS.requests(MODEL, "normal"), GROUP))["pending"] == 0


async def test_an_entry_answered_already_is_withdrawn_not_answered_again(
    tiny_worker: ThreadWorker, redis_url: str, redis_client: Any
) -> None:
    """An entry whose request has a final already (e.g. a worker answered it and died
    before acking) is admitted at once (markers are read after admission, off the path to
    the engine), then withdrawn: aborted in the engine, acked, never answered twice."""
    params = Params(max_tokens=400, ignore_eos=True)
    env = make_envelope(USER, model=MODEL, request_id="again-1", params=params)
    await _xadd(redis_client, encode_envelope(env))
    async with ChatClient(redis_url) as client:
        first = await client.result("again-1", timeout_s=30)
        await _lanes_drained(redis_client)
        completed = tiny_worker.worker.metrics.completed
        await _xadd(redis_client, encode_envelope(env))  # the same request, queued again
        await _lanes_drained(redis_client)
        # The worker is free again (the withdrawn copy holds no engine slot or budget).
        res = await client.chat(USER, model=MODEL, max_tokens=2, timeout_s=30)
    assert res.worker == "tw" and first.usage.completion_tokens == 400
    assert tiny_worker.worker.metrics.completed == completed + 1  # the chat, not the copy
    assert len(await _finals(redis_client, "again-1")) == 1
    assert (await redis_client.xpending(KEYS.requests(MODEL, "normal"), GROUP))["pending"] == 0
    assert tiny_worker.worker.intake is not None
    assert not tiny_worker.worker.intake.admission.admitted
