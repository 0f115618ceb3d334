"""Reclaimer against a real Redis: heartbeats, claims from dead workers only, dead letters."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
import redis.asyncio as aioredis

from producer import ChatClient, RequestFailed
from producer.contract.codec import decode_envelope
from producer.contract.keys import GROUP, STREAM_FIELD, Keys
from producer.contract.results import decode_result
from workers.errors import WorkerError
from workers.reclaim import ClaimedEntry, Reclaimer

MODEL = "tiny-chat"
KEYS = Keys()
LANE = KEYS.requests(MODEL, "normal")
MESSAGES = [{"role": "user", "content": "I forgot my password, help?"}]


async def make_lanes(r: Any) -> None:
    for lane in KEYS.request_lanes(MODEL):
        await r.xgroup_create(lane, GROUP, id="0", mkstream=True)


async def submit(url: str, n: int) -> list[str]:
    async with ChatClient(url) as client:
        return [await client.submit(MESSAGES, model=MODEL, max_tokens=8) for _ in range(n)]


async def deliver(r: Any, consumer: str, n: int, lane: str = LANE) -> list[str]:
    """What a worker's intake does: XREADGROUP new entries as ``consumer``."""
    reply = await r.xreadgroup(GROUP, consumer, {lane: ">"}, count=n)
    return [entry_id.decode() for entry_id, _ in reply[0][1]] if reply else []


async def pending_of(r: Any, consumer: str, lane: str = LANE) -> list[str]:
    rows = await r.xpending_range(lane, GROUP, "-", "+", 100, consumer)
    return [row["message_id"].decode() for row in rows]


async def consumers(r: Any, lane: str = LANE) -> set[str]:
    return {c["name"].decode() for c in await r.xinfo_consumers(lane, GROUP)}


FAST_TTL_S = 0.3  # short heartbeats, so a reclaimer sees Redis healthy for a TTL quickly


async def healthy(rec: Reclaimer) -> Reclaimer:
    """Beat until ``rec`` has seen Redis healthy for longer than its heartbeat TTL (it claims
    nothing before: the gate this waits on is what the tests of it check)."""
    while not rec.may_reclaim():
        await rec.beat({})
        await asyncio.sleep(FAST_TTL_S / 4)
    return rec


async def test_beat_writes_heartbeat_with_ttl_and_capacity(redis_client: Any) -> None:
    rec = Reclaimer(redis_client, KEYS, "w1", heartbeat_ttl_s=2.0)
    began = time.monotonic()
    await rec.beat({"free_tokens": 4096, "model": MODEL})
    value = json.loads(await redis_client.get(KEYS.heartbeat("w1")))
    assert value["worker"] == "w1" and value["pid"] > 0 and value["ttl_ms"] == 2000
    assert value["capacity"] == {"free_tokens": 4096, "model": MODEL}
    pttl = await redis_client.pttl(KEYS.heartbeat("w1"))
    # The TTL, less at most the time since the beat began (+1 ms of rounding).
    assert 2000 - (time.monotonic() - began) * 1000 - 1 <= pttl <= 2000
    await rec.retire()
    assert await redis_client.exists(KEYS.heartbeat("w1")) == 0


async def test_register_refuses_a_name_held_by_a_live_worker(redis_client: Any) -> None:
    first = Reclaimer(redis_client, KEYS, "w1")
    await first.register({})
    second = Reclaimer(redis_client, KEYS, "w1")
    with pytest.raises(WorkerError, match="in use"):
        await second.register({}, wait_s=0.2)
    await first.retire()
    await second.register({}, wait_s=0.2)


async def test_dead_workers_entries_are_claimed_and_time_is_measured(
    redis_url: str, redis_client: Any
) -> None:
    await make_lanes(redis_client)
    ids = await submit(redis_url, 3)
    dead = Reclaimer(redis_client, KEYS, "w-dead", heartbeat_ttl_s=0.5)
    live = Reclaimer(redis_client, KEYS, "w-live", heartbeat_ttl_s=0.5)
    beat_began = time.monotonic()
    await dead.beat({})
    # The beat's timestamp is taken before its SET: Redis expires the key up to this late.
    beat_s = time.monotonic() - beat_began
    await live.beat({})
    taken = await deliver(redis_client, "w-dead", 3)
    assert len(taken) == 3
    # While its heartbeat lives, nothing is claimed (the live worker sees its beat).
    alive_seen = time.monotonic()  # before a poll whose read found w-dead's heartbeat
    assert await live.reclaim(MODEL) == []
    assert await pending_of(redis_client, "w-dead") == taken

    # w-dead stops beating (killed); the live worker beats and polls reclaim like its loop
    # would (a reclaimer whose own heartbeat is gone claims nothing).
    start = time.monotonic()
    claimed: list[ClaimedEntry] = []
    while not claimed and time.monotonic() - start < 30:  # eventual: the TTL runs out
        await asyncio.sleep(0.05)
        await live.beat({})
        began, held_back = time.monotonic(), live.reclaims_held_back
        claimed = await live.reclaim(MODEL)
        if not claimed and live.reclaims_held_back == held_back:
            alive_seen = began  # an empty poll not held back: it saw no dead worker
    # The heartbeat expired after alive_seen and was claimed before now.
    window_ms = (time.monotonic() - alive_seen + beat_s) * 1000
    assert [c.entry_id for c in claimed] == taken
    assert all(c.delivery_count == 2 and c.stream == LANE for c in claimed)
    assert all(c.priority == "normal" for c in claimed)
    assert [decode_envelope(c.fields[STREAM_FIELD.encode()]).id for c in claimed] == ids
    assert await pending_of(redis_client, "w-live") == taken
    # The dead consumer had nothing left, so it is gone.
    assert await consumers(redis_client) == {"w-live"}

    (event,) = live.events
    assert event.dead_worker == "w-dead" and event.claimed == 3 and event.consumer_removed
    assert event.since_last_beat_ms is not None and event.since_expiry_ms is not None
    assert event.since_last_beat_ms >= 500  # death was after the last beat
    # Noticed within one poll (the host's clock; +2 ms for the whole-ms rounding of both ends).
    assert 0 <= event.since_expiry_ms <= window_ms + 2
    assert live.claimed_total == 3


async def test_live_slow_worker_keeps_its_entries_even_when_idle(
    redis_url: str, redis_client: Any
) -> None:
    await make_lanes(redis_client)
    await submit(redis_url, 2)
    slow = Reclaimer(redis_client, KEYS, "w-slow", heartbeat_ttl_s=10)
    await slow.beat({})
    taken = await deliver(redis_client, "w-slow", 2)
    other = Reclaimer(
        redis_client, KEYS, "w-other", safety_idle_s=0.05, sweep_interval_s=0.0,
        heartbeat_ttl_s=FAST_TTL_S,
    )  # fmt: skip
    await healthy(other)
    await asyncio.sleep(0.2)  # idle far beyond the safety-net threshold
    assert await other.reclaim(MODEL) == []
    assert await other.sweep(MODEL) == []
    assert other.stuck_entries == 2  # visible to metrics, not taken
    # Even the atomic claim itself refuses while the heartbeat key exists.
    assert await other._claim_from(MODEL, LANE, "w-slow") == []
    assert await pending_of(redis_client, "w-slow") == taken
    assert "w-slow" in await consumers(redis_client)


async def test_safety_sweep_claims_long_idle_entries_of_dead_owners(
    redis_url: str, redis_client: Any
) -> None:
    await make_lanes(redis_client)
    await submit(redis_url, 1)
    taken = await deliver(redis_client, "w-gone", 1)  # never beat at all
    rec = Reclaimer(redis_client, KEYS, "w-live", safety_idle_s=0.05)
    await rec.beat({})
    await asyncio.sleep(0.1)
    claimed = await rec.sweep(MODEL)
    assert [c.entry_id for c in claimed] == taken and rec.stuck_entries == 0


async def test_poison_entry_is_dead_lettered_once_and_requester_told(
    redis_url: str, redis_client: Any
) -> None:
    await make_lanes(redis_client)
    (request_id,) = await submit(redis_url, 1)
    # Delivery 1 to w0, which dies; w1 and w2 claim it (deliveries 2 and 3) and die too.
    await deliver(redis_client, "w0", 1)
    for holder in ("w1", "w2"):
        rec = await healthy(Reclaimer(redis_client, KEYS, holder, heartbeat_ttl_s=FAST_TTL_S))
        (claimed,) = await rec.reclaim(MODEL)
        await rec.retire()  # killed while running it
    assert claimed.delivery_count == 3
    # w3 would deliver it a 4th time: it goes to the dead letters instead.
    w3 = await healthy(Reclaimer(redis_client, KEYS, "w3", heartbeat_ttl_s=FAST_TTL_S))
    assert await w3.reclaim(MODEL) == []
    assert w3.dead_lettered_total == 1

    dead = await redis_client.xrange(KEYS.dead())
    assert len(dead) == 1
    fields = dead[0][1]
    assert fields[b"id"] == request_id.encode() and fields[b"deliveries"] == b"4"
    assert fields[b"stream"] == LANE.encode() and fields[b"dead_worker"] == b"w2"
    assert b"delivered 4 times" in fields[b"reason"]
    assert decode_envelope(fields[b"payload"]).id == request_id
    entries = await redis_client.xrange(KEYS.result(request_id))
    assert [decode_result(f).code for _, f in entries] == ["dead_letter"]  # type: ignore[union-attr]
    async with ChatClient(redis_url) as client:
        with pytest.raises(RequestFailed) as info:
            await client.result(request_id, timeout_s=1)
    assert info.value.code == "dead_letter"
    backlog = await redis_client.hgetall(KEYS.backlog(MODEL))
    assert backlog[b"tokens"] == b"0" and backlog[b"requests"] == b"0" and backlog[b"dead"] == b"1"
    assert await redis_client.xlen(LANE) == 0 and await consumers(redis_client) == {"w3"}

    # Nothing to do a second time: no second dead letter, no second result.
    w4 = await healthy(Reclaimer(redis_client, KEYS, "w4", heartbeat_ttl_s=FAST_TTL_S))
    assert await w4.reclaim(MODEL) == [] and await w4.sweep(MODEL) == []
    assert await redis_client.xlen(KEYS.dead()) == 1
    assert await redis_client.xlen(KEYS.result(request_id)) == 1


async def test_undecodable_poison_entry_is_dead_lettered_and_removed(redis_client: Any) -> None:
    await make_lanes(redis_client)
    await redis_client.xadd(LANE, {STREAM_FIELD: b"\xc1 not msgpack"})
    await deliver(redis_client, "w0", 1)
    rec = Reclaimer(redis_client, KEYS, "w-live", max_deliveries=1, heartbeat_ttl_s=FAST_TTL_S)
    assert await (await healthy(rec)).reclaim(MODEL) == []
    (entry,) = await redis_client.xrange(KEYS.dead())
    assert entry[1][b"id"] == b"" and entry[1][b"payload"] == b"\xc1 not msgpack"
    assert await redis_client.xlen(LANE) == 0
    assert await redis_client.xpending(LANE, GROUP) == {
        "pending": 0,
        "min": None,
        "max": None,
        "consumers": [],
    }


async def test_claim_own_after_restart_under_the_same_name(
    redis_url: str, redis_client: Any
) -> None:
    await make_lanes(redis_client)
    await submit(redis_url, 2)
    taken = await deliver(redis_client, "w1", 2)
    restarted = Reclaimer(redis_client, KEYS, "w1")
    await restarted.beat({})
    claimed = await restarted.claim_own(MODEL)
    assert [c.entry_id for c in claimed] == taken
    assert all(c.delivery_count == 2 for c in claimed)
    assert "w1" in await consumers(redis_client)  # its own consumer is never deleted


async def test_dead_consumer_removed_only_once_its_pending_list_is_empty(
    redis_url: str, redis_client: Any
) -> None:
    await make_lanes(redis_client)
    await submit(redis_url, 3)
    await deliver(redis_client, "w-dead", 3)
    await redis_client.xgroup_createconsumer(LANE, GROUP, "w-idle-live")
    await redis_client.set(KEYS.heartbeat("w-idle-live"), "{}", px=5000)
    rec = Reclaimer(redis_client, KEYS, "w-live", batch=2, heartbeat_ttl_s=FAST_TTL_S)
    await healthy(rec)
    first = await rec.reclaim(MODEL)  # batch of 2: one entry is still pending on w-dead
    assert len(first) == 2
    assert await consumers(redis_client) == {"w-dead", "w-idle-live", "w-live"}
    second = await rec.reclaim(MODEL)
    assert len(second) == 1
    assert await consumers(redis_client) == {"w-idle-live", "w-live"}
    assert [e.consumer_removed for e in rec.events] == [False, True]


async def test_reclaim_before_any_lane_exists(redis_client: Any) -> None:
    rec = Reclaimer(redis_client, KEYS, "w1")
    await rec.beat({})
    assert await rec.reclaim(MODEL) == []
    assert await rec.claim_own(MODEL) == []


async def test_a_lane_deleted_before_its_claim_gives_nothing_to_claim(
    redis_url: str, redis_client: Any
) -> None:
    """A dead worker's lane deleted (DEL, FLUSHALL) between listing it and claiming from it:
    the claim finds no group and returns nothing instead of failing the heartbeat loop."""
    await make_lanes(redis_client)
    await submit(redis_url, 2)
    live = Reclaimer(redis_client, KEYS, "w-live")
    await live.beat({})
    await deliver(redis_client, "w-gone", 2)
    await redis_client.delete(LANE)
    assert await live._claim_from(MODEL, LANE, "w-gone") == []


async def test_two_reclaimers_never_share_an_entry(redis_url: str, redis_client: Any) -> None:
    """Two live reclaimers race for a dead worker's entries. Both stay alive: they beat before
    every round, with a TTL (2 s) no round of this test comes near even on a loaded machine
    (with 0.3 s, one reclaimer could miss a beat, and the other then rightly took the entries
    of a worker that looked dead: not what this test is about)."""
    await make_lanes(redis_client)
    await submit(redis_url, 20)
    await deliver(redis_client, "w-dead", 20)
    other = aioredis.Redis.from_url(redis_url)
    try:
        a = Reclaimer(redis_client, KEYS, "wa", batch=5, heartbeat_ttl_s=2.0)
        b = Reclaimer(other, KEYS, "wb", batch=5, heartbeat_ttl_s=2.0)
        await asyncio.gather(healthy(a), healthy(b))
        got_a: list[str] = []
        got_b: list[str] = []
        for _ in range(4):
            await asyncio.gather(a.beat({}), b.beat({}))
            ra, rb = await asyncio.gather(a.reclaim(MODEL), b.reclaim(MODEL))
            got_a += [c.entry_id for c in ra]
            got_b += [c.entry_id for c in rb]
    finally:
        await other.aclose()
    assert not set(got_a) & set(got_b)
    assert len(got_a) + len(got_b) == 20


async def test_claiming_requires_a_heartbeat_first(redis_url: str, redis_client: Any) -> None:
    await make_lanes(redis_client)
    await submit(redis_url, 1)
    await deliver(redis_client, "w-dead", 1)
    rec = Reclaimer(redis_client, KEYS, "w-new")
    with pytest.raises(WorkerError, match="beat"):
        await rec.reclaim(MODEL)


async def test_no_reclaim_until_redis_was_seen_healthy_for_a_ttl(
    redis_url: str, redis_client: Any
) -> None:
    """A CLIENT PAUSE longer than the heartbeat TTL: when it ends, the holder's heartbeat has
    expired although the holder lives, so the reclaimer, whose own beat was held up by the
    pause, claims nothing until it has seen Redis healthy for a whole TTL again."""
    await make_lanes(redis_client)
    await submit(redis_url, 2)
    holder = Reclaimer(redis_client, KEYS, "w-holder", heartbeat_ttl_s=FAST_TTL_S)
    await holder.beat({})
    taken = await deliver(redis_client, "w-holder", 2)

    turn = asyncio.Event()  # the holder beats on its turns: the test decides whose beat
    turn.set()  # lands first after the pause (the race a real pause leaves open)

    async def holder_lives() -> None:
        while True:
            await turn.wait()
            await holder.beat({})
            await asyncio.sleep(FAST_TTL_S / 4)

    other_client = aioredis.Redis.from_url(redis_url)
    pauser = aioredis.Redis.from_url(redis_url)
    beating = asyncio.create_task(holder_lives())
    try:
        rec = await healthy(Reclaimer(other_client, KEYS, "w-rec", heartbeat_ttl_s=FAST_TTL_S))
        turn.clear()
        await pauser.execute_command("CLIENT", "PAUSE", int(FAST_TTL_S * 3000), "WRITE")
        await rec.beat({})  # held up by the pause: slower than half a TTL
        # The pause is over: the holder's key expired meanwhile, though the holder lives
        # and is about to beat.
        assert await redis_client.exists(KEYS.heartbeat("w-holder")) == 0
        assert not rec.may_reclaim()
        assert await rec.reclaim(MODEL) == []
        assert rec.reclaims_held_back == 1  # it saw a missing heartbeat and held back
        turn.set()
        await healthy(rec)
        assert await rec.reclaim(MODEL) == []
        assert await pending_of(redis_client, "w-holder") == taken
        # A holder that really stopped beating is claimed once Redis was seen healthy.
        beating.cancel()
        for _ in range(6):  # 1.5 TTLs of the reclaimer's own beats
            await rec.beat({})
            await asyncio.sleep(FAST_TTL_S / 4)
        claimed = await rec.reclaim(MODEL)
        assert [c.entry_id for c in claimed] == taken
    finally:
        beating.cancel()
        await other_client.aclose()
        await pauser.aclose()


async def test_a_pause_that_catches_the_reclaim_itself_holds_it_back(
    redis_url: str, redis_client: Any
) -> None:
    """The pause begins after the reclaimer's last beat, while its reclaim reads the lanes:
    when the read returns, the holder's heartbeat has expired (its beat waits behind the
    pause too), yet nothing is claimed; the count of healthy time starts again."""
    await make_lanes(redis_client)
    await submit(redis_url, 2)
    holder = Reclaimer(redis_client, KEYS, "w-holder", heartbeat_ttl_s=FAST_TTL_S)
    await holder.beat({})
    taken = await deliver(redis_client, "w-holder", 2)
    other_client = aioredis.Redis.from_url(redis_url)
    pauser = aioredis.Redis.from_url(redis_url)
    try:
        rec = Reclaimer(other_client, KEYS, "w-rec", heartbeat_ttl_s=FAST_TTL_S)
        while not rec.may_reclaim():  # the holder beats alongside, as a live worker does
            await asyncio.gather(rec.beat({}), holder.beat({}))
            await asyncio.sleep(FAST_TTL_S / 4)
        await pauser.execute_command("CLIENT", "PAUSE", int(FAST_TTL_S * 3000), "ALL")
        assert await rec.reclaim(MODEL) == []  # its reads waited out the pause
        assert await redis_client.exists(KEYS.heartbeat("w-holder")) == 0
        assert rec.reclaims_held_back == 1 and not rec.may_reclaim()
        assert await pending_of(redis_client, "w-holder") == taken
    finally:
        await other_client.aclose()
        await pauser.aclose()


async def test_a_reclaimer_that_stalled_waits_a_ttl_before_claiming(redis_client: Any) -> None:
    """Its own process stalled (SIGSTOP, a long GC) past half a TTL: the next beat starts the
    count again, as if Redis had been away."""
    rec = await healthy(Reclaimer(redis_client, KEYS, "w1", heartbeat_ttl_s=FAST_TTL_S))
    assert rec.may_reclaim()
    time.sleep(FAST_TTL_S)  # the loop blocked: no beat for a whole TTL
    await rec.beat({})
    assert not rec.may_reclaim() and rec.healthy_for_s() < FAST_TTL_S


async def test_a_redis_that_lost_the_heartbeats_gets_no_reclaim_until_seen_healthy(
    redis_url: str, redis_client: Any
) -> None:
    """Redis restarted from a snapshot older than the heartbeat TTL: every heartbeat in it
    has expired, the live holder's and the reclaimer's own, though no beat of either failed
    (the restart fell between beats). RECLAIM finds the reclaimer's own heartbeat missing
    and claims nothing; the count of healthy time starts again, and only a holder still
    without a heartbeat after it is claimed."""
    await make_lanes(redis_client)
    await submit(redis_url, 2)
    holder = Reclaimer(redis_client, KEYS, "w-holder")  # the default TTL: it stays live
    await holder.beat({})
    taken = await deliver(redis_client, "w-holder", 2)
    rec = await healthy(Reclaimer(redis_client, KEYS, "w-rec", heartbeat_ttl_s=FAST_TTL_S))
    # The rollback: both heartbeat keys gone at once, with no failed beat on either side.
    await redis_client.delete(KEYS.heartbeat("w-holder"), KEYS.heartbeat("w-rec"))
    assert rec.may_reclaim()  # nothing the reclaimer saw itself says Redis was away
    assert await rec.reclaim(MODEL) == []
    assert not rec.may_reclaim() and rec.reclaims_held_back == 1
    assert await pending_of(redis_client, "w-holder") == taken
    await holder.beat({})  # the live holder beats again within the reclaimer's TTL count
    await healthy(rec)
    assert await rec.reclaim(MODEL) == []
    assert await pending_of(redis_client, "w-holder") == taken
    # A holder that really is gone is claimed once the reclaimer saw Redis healthy again.
    await redis_client.delete(KEYS.heartbeat("w-holder"))
    claimed = await rec.reclaim(MODEL)
    assert [c.entry_id for c in claimed] == taken
