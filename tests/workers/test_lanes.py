"""Priority lanes with aging, on a real Redis: the PULL script's order and REQUEUE."""

from __future__ import annotations

import time
from typing import Any

from producer.contract.codec import encode_envelope, make_envelope
from producer.contract.keys import GROUP, STREAM_FIELD, Keys
from workers.lanes import Entry, Lanes

MODEL = "m"


async def _lanes(redis: Any, aging_s: float = 2.0, consumer: str = "w1") -> Lanes:
    lanes = Lanes(redis, Keys(), MODEL, consumer, aging_s=aging_s)
    await lanes.ensure_groups()
    await lanes.ensure_groups()  # BUSYGROUP is fine
    return lanes


async def _add(redis: Any, priority: str, tag: str, age_s: float = 0.0) -> None:
    """XADD with an id ``age_s`` in the past (the id's ms part is the enqueue time)."""
    env = make_envelope([{"role": "user", "content": tag}], model=MODEL, request_id=tag)
    stream = Keys().requests(MODEL, priority)
    ms = int((time.time() - age_s) * 1000)
    top = await redis.xrevrange(stream, count=1)
    if top:
        last_ms, last_seq = (int(x) for x in top[0][0].split(b"-"))
        entry_id = f"{last_ms}-{last_seq + 1}" if ms <= last_ms else f"{ms}-0"
    else:
        entry_id = f"{ms}-0"
    await redis.xadd(stream, {STREAM_FIELD: encode_envelope(env)}, id=entry_id)


def _content(e: Entry) -> str:
    import msgpack

    return str(msgpack.unpackb(e.fields[b"m"])["id"])


async def test_fresh_work_goes_high_then_normal_then_low(redis_client: Any) -> None:
    lanes = await _lanes(redis_client)
    for i in range(2):
        await _add(redis_client, "low", f"low{i}")
        await _add(redis_client, "normal", f"normal{i}")
        await _add(redis_client, "high", f"high{i}")
    got = await lanes.pull(6)
    assert [_content(e) for e in got] == ["high0", "high1", "normal0", "normal1", "low0", "low1"]
    assert [e.priority for e in got] == ["high"] * 2 + ["normal"] * 2 + ["low"] * 2
    assert await lanes.pull(3) == []


async def test_pull_count_is_respected_and_nothing_is_delivered_twice(redis_client: Any) -> None:
    lanes = await _lanes(redis_client)
    for i in range(5):
        await _add(redis_client, "normal", f"n{i}")
    first = await lanes.pull(2)
    second = await lanes.pull(10)
    assert [_content(e) for e in first] == ["n0", "n1"]
    assert [_content(e) for e in second] == ["n2", "n3", "n4"]
    pending = await redis_client.xpending(Keys().requests(MODEL, "normal"), GROUP)
    assert pending["pending"] == 5


async def test_aging_promotes_old_low_work_over_fresh_high_work(redis_client: Any) -> None:
    lanes = await _lanes(redis_client, aging_s=2.0)
    await _add(redis_client, "low", "old-low", age_s=5.0)  # score 0 + 5/2 = 2.5
    await _add(redis_client, "high", "fresh-high")  # score 2 + 0
    await _add(redis_client, "normal", "old-normal", age_s=1.0)  # score 1 + 0.5
    got = await lanes.pull(1)
    assert [_content(e) for e in got] == ["old-low"]
    assert got[0].level(2.0) == 2  # promoted to the engine's top priority too
    assert [_content(e) for e in await lanes.pull(2)] == ["fresh-high", "old-normal"]


async def test_low_priority_never_starves_under_a_stream_of_high(redis_client: Any) -> None:
    """Keep the high lane non-empty with fresh work; the low request still gets its turn
    once it has waited 2 × aging_s (here 0.2 s)."""
    lanes = await _lanes(redis_client, aging_s=0.1)
    await _add(redis_client, "low", "the-low")
    served_low_after_s = None
    start = time.monotonic()
    for i in range(200):
        await _add(redis_client, "high", f"h{i}")
        got = [_content(e) for e in await lanes.pull(1)]
        if got == ["the-low"]:
            served_low_after_s = time.monotonic() - start
            break
        time.sleep(0.005)
    # The outcome, not a time: served within the 200 rounds (each sleeps 5 ms, so at least
    # 1 s of waiting, five times the 0.2 s it needs; a slow machine only makes it older).
    assert served_low_after_s is not None, "low request starved"
    print(f"low served after {served_low_after_s:.2f} s")


async def test_wait_blocks_until_an_entry_arrives(redis_client: Any) -> None:
    lanes = await _lanes(redis_client)
    t0 = time.monotonic()
    assert await lanes.wait(100) == []
    assert time.monotonic() - t0 >= 0.09
    await _add(redis_client, "low", "late")
    assert [_content(e) for e in await lanes.wait(1000)] == ["late"]


async def test_missing_groups_are_recreated(redis_client: Any) -> None:
    lanes = await _lanes(redis_client)
    await redis_client.flushall()
    assert await lanes.pull(5) == []  # re-creates the groups
    await _add(redis_client, "high", "after-flush")
    assert [_content(e) for e in await lanes.pull(5)] == ["after-flush"]


async def test_requeue_hands_back_only_entries_still_pending_here(redis_client: Any) -> None:
    keys = Keys()
    lanes = await _lanes(redis_client)
    other = await _lanes(redis_client, consumer="w2")
    for i in range(3):
        await _add(redis_client, "normal", f"r{i}")
    mine = await lanes.pull(3)
    # r1 was claimed by another worker meanwhile; r2 already has a final result.
    await redis_client.xclaim(mine[1].stream, GROUP, "w2", 0, [mine[1].entry_id])
    await redis_client.set(keys.final("r2"), "done")
    assert await lanes.requeue(mine) == 1
    again = await other.pull(10)
    assert [_content(e) for e in again] == ["r0"]  # back at the end of its lane, once
    stream = keys.requests(MODEL, "normal")
    pending = await redis_client.xpending_range(stream, GROUP, "-", "+", 10)
    owners = sorted((p["consumer"].decode(), p["message_id"].decode()) for p in pending)
    assert [o for o, _ in owners] == ["w2", "w2"]  # r1 untouched, r0 re-delivered to w2
    assert await redis_client.xlen(stream) == 2  # r2 acked and deleted


async def test_stale_takes_back_idle_entries_pending_on_us_that_we_do_not_hold(
    redis_client: Any,
) -> None:
    """What a Redis restarted from older data hands back: entries pending on this consumer
    that it does not hold. Held ones, fresh ones (on their way in) and other consumers'
    are left alone; deleted ones are dropped; the delivery count goes up."""
    lanes = await _lanes(redis_client)
    for tag in ("held", "lost", "fresh", "gone"):
        await _add(redis_client, "normal", tag)
    await _add(redis_client, "normal", "theirs")
    mine = {_content(e): e for e in await lanes.pull(4)}
    await (await _lanes(redis_client, consumer="w2")).pull(1)
    await redis_client.xdel(Keys().requests(MODEL, "normal"), mine["gone"].entry_id)
    time.sleep(0.15)  # idle past the threshold below (Redis's clock counts idle time)
    await redis_client.xclaim(mine["fresh"].stream, GROUP, "w1", 0, [mine["fresh"].entry_id])
    held = {(mine["held"].stream, mine["held"].entry_id)}
    stale = await lanes.stale(100, held)
    assert [(_content(e), e.delivery_count) for e in stale] == [("lost", 2)]
    assert stale[0].redelivered
    assert await lanes.stale(100, held) == []  # claimed again just now: not idle any more


async def test_a_pull_shares_its_count_over_the_partitions_in_turn(redis_client: Any) -> None:
    """Three partitions, work in two: each pull gives every partition its share (the one
    served first rotates) and the unused rest to the others; within a partition high goes
    before low; a pull smaller than the partitions still finds the work; nothing twice."""
    keys = Keys(partitions=3)
    lanes = Lanes(redis_client, keys, MODEL, "w1", aging_s=60.0)
    await lanes.ensure_groups()
    env = encode_envelope(make_envelope([{"role": "user", "content": "x"}], model=MODEL))
    for _ in range(6):
        await redis_client.xadd(keys.requests(MODEL, "low", 0), {STREAM_FIELD: env})
        await redis_client.xadd(keys.requests(MODEL, "low", 1), {STREAM_FIELD: env})
        await redis_client.xadd(keys.requests(MODEL, "high", 1), {STREAM_FIELD: env})
    first = await lanes.pull(6)  # shares 2 / 2 / 2 from partition 0; partition 2 has none
    assert len(first) == 6 and {Keys.partition_in(e.stream) for e in first} == {0, 1}
    from_1 = [e.priority for e in first if Keys.partition_in(e.stream) == 1]
    assert from_1 and set(from_1) == {"high"}  # partition 1's high lane before its low one
    second = await lanes.pull(1)  # partition 1 first now: one entry, found though share 0
    assert len(second) == 1
    rest = await lanes.pull(100)
    seen = [(e.stream, e.entry_id) for e in [*first, *second, *rest]]
    assert len(seen) == len(set(seen)) == 18
    assert await lanes.pull(5) == []
