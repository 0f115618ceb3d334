"""A real worker (engine process, tiny checkpoint, real tokenizer) behind a real Redis."""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import msgpack
import pytest
import torch

from gpu_engine.sequence import SamplingParams
from producer import ClientSettings, QueueFull
from producer.client import ChatClient
from producer.contract.codec import encode_envelope, make_envelope
from producer.contract.enqueue import RETRY_JITTER
from producer.contract.envelope import Envelope, Message, now_unix_ms
from producer.contract.keys import COST_FIELD, GROUP, STREAM_FIELD, Keys
from producer.contract.reservation import cancel_digest, reservation_value
from producer.contract.results import decode_result
from producer.errors import ProtocolError, RequestFailed
from tests.workers.conftest import MODEL, ThreadWorker, tiny_settings

KEYS = Keys()
USER = [{"role": "user", "content": "Where is my order?"}]


async def _finals(redis: Any, request_id: str) -> list[Any]:
    entries = await redis.xrange(KEYS.result(request_id))
    results = [decode_result(fields) for _, fields in entries]
    return [r for r in results if type(r).__name__ in ("Done", "Error")]


_SEQ = itertools.count()


async def _xadd(
    redis: Any, payload: bytes, rid: str | None = None, *, digest: str = "",
    priority: str = "normal",
) -> str:  # fmt: skip
    """Add an entry with raw commands, reserving ``rid`` for it as ENQUEUE would (before the
    entry exists: its id is chosen here, a millisecond ahead of the server's clock)."""
    sec, usec = await redis.time()
    entry_id = f"{sec * 1000 + usec // 1000 + 1}-{next(_SEQ)}"
    lane = KEYS.requests(MODEL, priority)
    if rid is not None:
        await redis.set(KEYS.reservation(rid), reservation_value(lane, entry_id, digest))
    await redis.xadd(lane, {STREAM_FIELD: payload}, id=entry_id)
    return entry_id


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
    await _xadd(redis_client, msgpack.packb(bad_field), "bad-field")
    await _xadd(redis_client, msgpack.packb(unknown_version), "bad-version")
    await _xadd(redis_client, msgpack.packb(huge_content), "huge-content")
    # > 1 MiB: over the payload limit
    await _xadd(redis_client, msgpack.packb(huge_payload), "huge-payload")
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
        dead = await redis_client.xrange(KEYS.dead())
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
        # ...and the worker goes on serving: a full answer, from this worker.
        after = await client.chat(USER, model=MODEL, max_tokens=2, ignore_eos=True, timeout_s=30)
    assert after.worker == "tw" and after.usage.completion_tokens == 2
    assert after.finish_reason == "length"


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
    await _xadd(redis_client, encode_envelope(env), env.id)
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


async def test_cancel_of_a_queued_request_skips_it(
    tiny_worker: ThreadWorker, redis_url: str, redis_client: Any
) -> None:
    env = make_envelope(
        USER, model=MODEL, request_id="cancel-queued", params=SamplingParams(max_tokens=8)
    )
    sec, usec = await redis_client.time()
    entry_id = f"{sec * 1000 + usec // 1000 + 1}-{next(_SEQ)}"
    lane = KEYS.requests(MODEL, "normal")
    await redis_client.set(
        KEYS.reservation(env.id), reservation_value(lane, entry_id, cancel_digest("tok"))
    )
    async with ChatClient(redis_url) as client:
        # marker first, then it reaches the lane
        assert await client.cancel("cancel-queued", "tok")
        await redis_client.xadd(lane, {STREAM_FIELD: encode_envelope(env)}, id=entry_id)
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
        assert await client.cancel(rid)
        with pytest.raises(RequestFailed) as info:
            await client.result(rid, timeout_s=60)
    assert info.value.code == "cancelled"
    # The engine freed the request's KV blocks: all of the cache is free again (eventually;
    # the bound is only there to end the test).
    deadline = time.monotonic() + 60
    while tiny_worker.capacity.running_seqs or (
        tiny_worker.capacity.free_kv_tokens < tiny_worker.capacity.total_kv_tokens
    ):
        assert time.monotonic() < deadline, tiny_worker.capacity
        await asyncio.sleep(0.05)
    assert len(await _finals(redis_client, rid)) == 1


async def test_high_priority_overtakes_queued_low_priority(
    tiny_worker: ThreadWorker, redis_url: str, redis_client: Any
) -> None:
    """The worker holds 4 requests at most. With 4 long ones running, 4 low and then 4 high
    requests queue in Redis; when the long ones are cancelled, the high ones go first.
    Order on the server's clock: the id of each answer's first result entry (its first
    token, XADDed by the worker) carries Redis's time; a low request is admitted only when a
    high one has finished, so every high starts no later than any low."""
    async with ChatClient(redis_url) as client:
        blockers = [
            await client.submit(USER, model=MODEL, max_tokens=1500, ignore_eos=True, stream=True)
            for _ in range(4)
        ]
        for rid in blockers:  # all four are running
            await client.stream(rid, timeout_s=30).__anext__()
        queued: list[tuple[str, str]] = []
        for prio in ("low", "high"):
            for _ in range(4):
                rid = await client.submit(
                    USER, model=MODEL, max_tokens=4, ignore_eos=True, priority=prio, stream=True
                )
                queued.append((prio, rid))
        for rid in blockers:
            await client.cancel(rid)
        for _, rid in queued:
            await client.result(rid, timeout_s=60)
    first_ms: dict[str, int] = {}
    for _, rid in queued:
        (entry_id, _fields), *_ = await redis_client.xrange(KEYS.result(rid), count=1)
        first_ms[rid] = int(entry_id.split(b"-")[0])
    order = sorted(queued, key=lambda q: first_ms[q[1]])
    highs = [first_ms[rid] for prio, rid in queued if prio == "high"]
    lows = [first_ms[rid] for prio, rid in queued if prio == "low"]
    assert max(highs) <= min(lows), [(prio, first_ms[rid]) for prio, rid in order]


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
    await redis_client.set(KEYS.reservation(env.id), reservation_value(lane, entry_id.decode()))
    for g in ghosts[1:]:  # two more workers took it over and died
        await redis_client.xclaim(lane, GROUP, g, 0, [entry_id])
    info = await redis_client.xpending_range(lane, GROUP, "-", "+", 10)
    assert [(p["consumer"], p["times_delivered"]) for p in info] == [(b"ghost-3", 3)]
    await redis_client.delete(*[KEYS.heartbeat(g) for g in ghosts])
    async with ChatClient(redis_url) as client:
        with pytest.raises(RequestFailed) as failed:
            await client.result("poison-1", timeout_s=20)
        assert failed.value.code == "dead_letter"
        dead = await redis_client.xrange(KEYS.dead())
        assert [fields[b"id"] for _, fields in dead] == [b"poison-1"]
        assert len(await _finals(redis_client, "poison-1")) == 1
        await _lanes_drained(redis_client)
        # ...and the worker goes on serving.
        assert (await client.chat(USER, model=MODEL, max_tokens=2, timeout_s=30)).worker == "tw"


async def test_same_request_queued_twice_is_answered_once_and_both_entries_acked(
    tiny_worker: ThreadWorker, redis_url: str, redis_client: Any
) -> None:
    env = make_envelope(
        USER, model=MODEL, request_id="twice-1", params=SamplingParams(max_tokens=30)
    )
    sec, usec = await redis_client.time()
    ms = sec * 1000 + usec // 1000 + 1
    first, copy = f"{ms}-{next(_SEQ)}", f"{ms}-{next(_SEQ)}"
    pipe = redis_client.pipeline(transaction=True)
    # Reserved for the first: the copy (raw commands) is parked, never run or answered.
    pipe.set(KEYS.reservation(env.id), reservation_value(KEYS.requests(MODEL, "normal"), first))
    for entry_id in (first, copy):
        pipe.xadd(KEYS.requests(MODEL, "normal"), {STREAM_FIELD: encode_envelope(env)}, id=entry_id)
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
    params = SamplingParams(max_tokens=400, ignore_eos=True)
    env = make_envelope(USER, model=MODEL, request_id="again-1", params=params)
    await _xadd(redis_client, encode_envelope(env), env.id)
    async with ChatClient(redis_url) as client:
        first = await client.result("again-1", timeout_s=30)
        await _lanes_drained(redis_client)
        completed = tiny_worker.worker.metrics.completed
        # The same request, queued again (its reservation follows, as REQUEUE's does)
        await _xadd(redis_client, encode_envelope(env), env.id)
        await _lanes_drained(redis_client)
        # The worker is free again (the withdrawn copy holds no engine slot or budget).
        res = await client.chat(USER, model=MODEL, max_tokens=2, timeout_s=30)
    assert res.worker == "tw" and first.usage.completion_tokens == 400
    assert tiny_worker.worker.metrics.completed == completed + 1  # the chat, not the copy
    assert len(await _finals(redis_client, "again-1")) == 1
    assert (await redis_client.xpending(KEYS.requests(MODEL, "normal"), GROUP))["pending"] == 0
    assert tiny_worker.worker.intake is not None
    assert not tiny_worker.worker.intake.admission.admitted


async def _hold_all_slots(client: ChatClient) -> list[Any]:
    """Four long requests running: the worker (4 slots) takes nothing more until cancelled."""
    blockers = [
        await client.submit(USER, model=MODEL, max_tokens=1500, ignore_eos=True, stream=True)
        for _ in range(4)
    ]
    for rid in blockers:
        await client.stream(rid, timeout_s=30).__anext__()
    return blockers


def _forged_copy(rid: Any) -> Envelope:
    """A high-priority envelope that claims the victim's id with another (longer) prompt."""
    return make_envelope(
        [{"role": "user", "content": "FORGED ANSWER please " * 20}], model=MODEL,
        request_id=str(rid), params=SamplingParams(max_tokens=4), priority="high",
    )  # fmt: skip


async def _assert_own_answer_and_copy_parked(
    redis_client: Any, rid: Any, result: Any, baseline: Any
) -> None:
    """The victim got one answer, to its own prompt; the copy was parked unanswered."""
    assert result.usage.prompt_tokens == baseline.usage.prompt_tokens  # its own prompt
    assert len(await _finals(redis_client, rid)) == 1
    dead = await redis_client.xrange(KEYS.dead())
    assert [f[b"reason"] for _, f in dead] == [b"not the entry its request id was reserved for"]


async def test_a_copy_of_a_queued_id_does_not_hijack_it(
    tiny_worker: ThreadWorker, redis_url: str, redis_client: Any
) -> None:
    """An attacker who learned a queued id adds an envelope with that id to the high lane
    with raw commands (ENQUEUE refuses the id), and a cancel marker without the token: the
    victim still gets its own answer, the copy is parked in the dead letters unanswered."""
    victim_chat = [{"role": "user", "content": "Where is my order?"}]
    async with ChatClient(redis_url) as client:
        baseline = await client.chat(victim_chat, model=MODEL, max_tokens=4, timeout_s=30)
        blockers = await _hold_all_slots(client)
        rid = await client.submit(victim_chat, model=MODEL, max_tokens=4)
        forged = _forged_copy(rid)
        with pytest.raises(ProtocolError):  # through ENQUEUE: the id is taken
            await client.submit(forged.messages, model=MODEL, request_id=str(rid))
        high = KEYS.requests(MODEL, "high")
        await redis_client.xadd(high, {STREAM_FIELD: encode_envelope(forged)})
        await redis_client.set(KEYS.cancelled(rid), "not-the-token")
        for blocker in blockers:
            await client.cancel(blocker)
        result = await client.result(rid, timeout_s=30)
        await _lanes_drained(redis_client)
    await _assert_own_answer_and_copy_parked(redis_client, rid, result, baseline)


async def test_a_copy_under_the_queued_entry_s_own_stream_id_does_not_hijack_it(
    tiny_worker: ThreadWorker, redis_url: str, redis_client: Any
) -> None:
    """Stream entry ids are per stream: a copy added by hand to the high lane with the
    explicit id of the victim's entry in the normal lane (which a producer may read from
    the id's reservation) is not the reserved entry either: parked, never answered."""
    victim_chat = [{"role": "user", "content": "Where is my order?"}]
    async with ChatClient(redis_url) as client:
        baseline = await client.chat(victim_chat, model=MODEL, max_tokens=4, timeout_s=30)
        blockers = await _hold_all_slots(client)
        rid = await client.submit(victim_chat, model=MODEL, max_tokens=4)
        reservation = (await redis_client.get(KEYS.reservation(rid))).decode()
        entry_id = reservation.split(" ")[0].rpartition("/")[2]  # a producer may GET it
        assert await redis_client.xrange(KEYS.requests(MODEL, "normal"), entry_id, entry_id)
        forged = _forged_copy(rid)
        high = KEYS.requests(MODEL, "high")
        await redis_client.xadd(high, {STREAM_FIELD: encode_envelope(forged)}, id=entry_id)
        for blocker in blockers:
            await client.cancel(blocker)
        result = await client.result(rid, timeout_s=30)
        await _lanes_drained(redis_client)
    await _assert_own_answer_and_copy_parked(redis_client, rid, result, baseline)


async def test_entries_added_without_enqueue_are_parked_and_give_nothing_back(
    tiny_worker: ThreadWorker, redis_url: str, redis_client: Any
) -> None:
    """#17: a producer may XADD to a lane by hand (Redis runs ENQUEUE under the caller's
    ACL, so it must hold XADD). Such an entry (no reservation; no cost field, or a made-up
    one; or not even an envelope) is parked in the dead letters without running, and gives
    nothing back to the backlog or the totals: ENQUEUE never charged it. Before, parking one
    took its made-up cost and a request off the counters ENQUEUE's bounds read (here: the
    all-models total lost the charge of a request still queued for another model)."""
    async with ChatClient(redis_url, allow_unserved=True) as client:
        await client.submit(USER, model="stranded", max_tokens=8)  # queued for good
        stranded = await redis_client.hgetall(KEYS.backlog("stranded"))
        rid = await client.submit(USER, model=MODEL, max_tokens=64, ignore_eos=True)
        copy = make_envelope(USER, model=MODEL, request_id=str(rid), max_tokens=4)
        fresh = make_envelope(USER, model=MODEL, request_id="nobody-reserved-it", max_tokens=4)
        lane = KEYS.requests(MODEL, "high")
        for fields in (
            {STREAM_FIELD: encode_envelope(fresh)},
            {STREAM_FIELD: encode_envelope(copy), COST_FIELD: 10**9},
            {STREAM_FIELD: b"\xc1 not msgpack", COST_FIELD: 10**9},
        ):
            await redis_client.xadd(lane, fields)
        result = await client.result(rid, timeout_s=30)
        deadline = time.monotonic() + 20
        while await redis_client.xlen(KEYS.dead()) < 3:
            assert time.monotonic() < deadline, "not parked"
            await asyncio.sleep(0.05)
    assert result.usage.completion_tokens == 64  # its own answer (the copy asked for 4)
    assert await redis_client.hmget(KEYS.totals(), "tokens", "models") == [
        stranded[b"tokens"],
        b"1",
    ]
    assert await redis_client.hmget(KEYS.backlog(MODEL), "tokens", "requests") == [b"0", b"0"]
    assert await redis_client.hgetall(KEYS.backlog("stranded")) == stranded
    assert await redis_client.exists(KEYS.result("nobody-reserved-it")) == 0
    assert await redis_client.xlen(lane) == 0


async def test_a_cancel_without_the_token_is_ignored(
    tiny_worker: ThreadWorker, redis_url: str, redis_client: Any
) -> None:
    """Cancels written with raw commands (no token, a wrong one) reach every worker's cancel
    loop; the running request is not aborted, and answers in full."""
    async with ChatClient(redis_url) as client:
        rid = await client.submit(USER, model=MODEL, max_tokens=48, ignore_eos=True, stream=True)
        await client.stream(rid, timeout_s=30).__anext__()  # running
        await redis_client.xadd(KEYS.cancel(), {"id": str(rid)})
        await redis_client.xadd(KEYS.cancel(), {"id": str(rid), "token": "guess"})
        result = await client.result(rid, timeout_s=30)
    assert result.finish_reason == "length" and result.usage.completion_tokens == 48


async def test_queue_full_retry_after_follows_the_rate_the_worker_measured(
    tiny_worker: ThreadWorker, redis_url: str, redis_client: Any
) -> None:
    """The drain rate behind ``QueueFull``'s Retry-After comes from a real worker's finals
    (FINALIZE_MANY samples it over windows while work waits, on the server's clock); the
    refusal's Retry-After is the documented formula at that rate."""
    async with ChatClient(redis_url) as client:
        rate = 0.0
        for _ in range(50):  # rounds until a busy window has closed (a bound, not a target)
            # A longer answer still running when a short one ends: the backlog stays busy
            # between the two finals, so a window opens and closes (idle time never counts;
            # nor does a window under 0.1 s: the long answer's last 250 tokens outlast it).
            long_rid = await client.submit(USER, model=MODEL, max_tokens=256, ignore_eos=True)
            await client.chat(USER, model=MODEL, max_tokens=4, ignore_eos=True, timeout_s=60)
            await client.result(long_rid, timeout_s=60)
            rate = float(await redis_client.hget(KEYS.backlog(MODEL), "rate") or 0)
            if rate > 0:
                break
        assert rate > 0, "the worker's finals measured no drain rate"
        # A long request keeps its cost in the backlog (given back at its final) while the
        # next one is refused; no other final lands meanwhile, so the rate stays put.
        long_id = await client.submit(USER, model=MODEL, max_tokens=1500, ignore_eos=True)
        queued = int(await redis_client.hget(KEYS.backlog(MODEL), "tokens"))
        await redis_client.hset(KEYS.backlog(MODEL), "promised", 0)  # no earlier refusals
        # The worker's beats mark the model served again after the test's flush (a bound,
        # not a target): its refusal then says a live worker drains the queue.
        for _ in range(100):
            if await redis_client.zscore(KEYS.served(), MODEL) is not None:
                break
            await asyncio.sleep(0.1)
        limit = queued  # nothing more fits
        small = ChatClient(settings=ClientSettings(redis_url=redis_url, max_backlog_tokens=limit))
        async with small:
            with pytest.raises(QueueFull) as info:
                await small.submit(USER, model=MODEL, max_tokens=100)
        await client.cancel(long_id)
    content_bytes = len(USER[0]["content"].encode())
    cost = content_bytes // 4 + 8 + 100  # the rule docs/protocol.md states
    assert info.value.backlog_tokens == queued and info.value.limit_tokens == limit
    assert not info.value.no_live_worker  # the tiny worker serves the model
    # ENQUEUE's hint: the excess over the bound at the measured rate (ms, rounded down),
    # spread by the client's jitter.
    hint_s = min(max(int(1000 * (queued + cost - limit) / rate), 50), 60_000) / 1000
    assert info.value.retry_after_s == pytest.approx(hint_s, rel=RETRY_JITTER + 0.01, abs=0.002)


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA devices"
)
async def test_tensor_parallel_worker_answers_like_a_single_gpu_one(
    redis_server: Any, tiny_checkpoint: Any
) -> None:
    """A worker with ``tensor_parallel_size=2`` (its engine spread over two GPUs) serves
    through the queue like any worker, with the greedy answer of a one-GPU worker."""
    ckpt = tiny_checkpoint("llama")
    answers: dict[int, Any] = {}
    for tp in (1, 2):
        settings = tiny_settings(
            redis_server.url, ckpt, name=f"tp{tp}", device="cuda:0", dtype="float32",
            tensor_parallel_size=tp, served_model_name=f"tiny-tp{tp}",
        )  # fmt: skip
        handle = ThreadWorker(settings).start(timeout_s=300)
        try:
            async with ChatClient(redis_server.url) as client:
                answers[tp] = await client.chat(
                    USER, model=f"tiny-tp{tp}", max_tokens=24, temperature=0, ignore_eos=True,
                    timeout_s=120,
                )  # fmt: skip
        finally:
            handle.stop()
    assert answers[2].worker == "tp2" and answers[2].usage.completion_tokens == 24
    assert answers[2].text == answers[1].text
