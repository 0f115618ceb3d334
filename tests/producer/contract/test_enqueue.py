"""ENQUEUE charges each request's backlog cost itself, from its envelope, by one rule (UTF-8
bytes of the contents / 4, + 8 per message, + max_tokens) that no producer computes, stores
it in the entry, and FINALIZE gives exactly that back."""

from __future__ import annotations

import re
from typing import Any

import msgpack
import pytest
import redis

from gpu_engine.sequence import SamplingParams
from producer import ChatClient, ClientSettings, QueueFull
from producer.contract.bounds import DEFAULT_BOUNDS, QueueBounds, bounds_fields, write_bounds
from producer.contract.codec import encode_envelope, make_envelope
from producer.contract.enqueue import enqueue_call
from producer.contract.keys import (
    COST_FIELD,
    GROUP,
    IDEMPOTENCY_TTL_S,
    IDLE_BACKLOG_TTL_S,
    STREAM_FIELD,
    Keys,
)
from producer.contract.scripts import ENQUEUE, lua
from tests.producer.test_client import DONE, MODEL, FakeWorkerSide

KEYS = Keys()
CHATS = {
    "ascii": [{"role": "user", "content": "x" * 400}],
    # é: 2 bytes, 🚚: 4 bytes (2 UTF-16 units), 你好: 3 bytes each
    "multi-byte": [
        {"role": "system", "content": "Réponds en français. 🚚"},
        {"role": "user", "content": "你好，我的订单在哪里？ 📦✨"},
    ],
}


def rule(messages: list[dict[str, str]], max_tokens: int) -> int:
    content_bytes = sum(len(m["content"].encode("utf-8")) for m in messages)
    return content_bytes // 4 + 8 * len(messages) + max_tokens


async def _charged(redis_client: Any) -> list[int]:
    entries = await redis_client.xrange(KEYS.requests(MODEL, "normal"))
    return [int(fields[COST_FIELD.encode()]) for _, fields in entries]


@pytest.mark.parametrize("name", sorted(CHATS))
async def test_the_charge_follows_the_rule_and_is_stored_in_the_entry(
    redis_url: str, redis_client: Any, name: str
) -> None:
    chat = CHATS[name]
    async with ChatClient(redis_url) as client:
        await client.submit(chat, model=MODEL, max_tokens=50)
    assert rule(CHATS["ascii"], 50) == 100 + 8 + 50
    assert await _charged(redis_client) == [rule(chat, 50)]
    backlog = await redis_client.hgetall(KEYS.backlog(MODEL))
    assert int(backlog[b"tokens"]) == rule(chat, 50) and int(backlog[b"requests"]) == 1


def test_the_default_max_tokens_in_the_script_is_the_envelope_default() -> None:
    match = re.search(r"local DEFAULT_MAX_TOKENS = (\d+)", lua("enqueue"))
    assert match is not None and int(match.group(1)) == SamplingParams().max_tokens


async def test_an_envelope_without_params_is_charged_the_default_max_tokens(
    redis_url: str, redis_client: Any
) -> None:
    env = make_envelope(CHATS["multi-byte"], model=MODEL)
    wire = env.to_wire()
    del wire["params"]
    payload = msgpack.packb(wire, use_bin_type=True)
    call = enqueue_call(KEYS, 10_000, [(env, payload)], each=True, allow_unserved=True)
    sync = redis.Redis.from_url(redis_url)
    try:
        reply = sync.register_script(ENQUEUE)(keys=call.keys, args=call.args)
    finally:
        sync.close()
    assert int(reply[1][0][0]) == 1
    assert await _charged(redis_client) == [rule(CHATS["multi-byte"], 256)]


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"messages": "hi"}, "messages must be a list"),
        ({"messages": [{"role": "user"}]}, "every message needs a string content"),
        ({"id": 5}, "id must be a string"),
        ({"model": "other"}, "model must be the model named at its model index"),
        ({"params": {"max_tokens": -1}}, "params.max_tokens must be an integer"),
        ({"params": {"max_tokens": 1.5}}, "params.max_tokens must be an integer"),
    ],
)
async def test_an_envelope_the_charge_cannot_be_read_from_fails_the_call(
    redis_url: str, redis_client: Any, change: dict[str, Any], why: str
) -> None:
    env = make_envelope(CHATS["ascii"], model=MODEL)
    good = encode_envelope(env)
    bad = msgpack.packb({**env.to_wire(), **change}, use_bin_type=True)
    call = enqueue_call(KEYS, 10_000, [(env, good), (env, bad)], each=True, allow_unserved=True)
    sync = redis.Redis.from_url(redis_url)
    try:
        with pytest.raises(redis.ResponseError, match=f"request 2: {re.escape(why)}"):
            sync.register_script(ENQUEUE)(keys=call.keys, args=call.args)
    finally:
        sync.close()
    assert await redis_client.dbsize() == 0  # nothing of the call was written


async def test_not_msgpack_fails_the_call(redis_url: str) -> None:
    env = make_envelope(CHATS["ascii"], model=MODEL)
    call = enqueue_call(KEYS, 10_000, [(env, b"\xc1 not msgpack")], each=True, allow_unserved=True)
    sync = redis.Redis.from_url(redis_url)
    try:
        with pytest.raises(redis.ResponseError, match="request 1: the envelope is not a"):
            sync.register_script(ENQUEUE)(keys=call.keys, args=call.args)
    finally:
        sync.close()


async def test_an_id_is_enqueued_once(redis_url: str, redis_client: Any) -> None:
    """A second ENQUEUE of an id (queued, answered or expired-but-answered) is refused
    before anything is written or charged; so is the same id twice in one call."""
    worker = FakeWorkerSide(redis_url)
    env = make_envelope(CHATS["multi-byte"], model=MODEL, max_tokens=40)
    async with ChatClient(redis_url) as client:
        outcomes = []
        for pair in ([env], [env], [env, env]):
            call = enqueue_call(
                KEYS,
                10_000,
                [(e, encode_envelope(e)) for e in pair],
                each=True,
                allow_unserved=True,
            )
            reply = await client._enqueue(keys=call.keys, args=call.args)
            outcomes += [int(o[0]) for o in reply[1]]
        assert outcomes == [1, 3, 3, 3]
        assert await _charged(redis_client) == [rule(CHATS["multi-byte"], 40)]
        entry_id, taken = worker.take()
        reservation = await redis_client.get(KEYS.reservation(env.id))
        lane = KEYS.requests(env.model, env.priority).encode()
        assert reservation.split(b" ")[0] == lane + b"/" + entry_id
        worker.final(entry_id, taken, DONE)
        await redis_client.delete(KEYS.reservation(env.id))  # as if it had expired
        call = enqueue_call(
            KEYS, 10_000, [(env, encode_envelope(env))], each=True, allow_unserved=True
        )
        reply = await client._enqueue(keys=call.keys, args=call.args)
        assert int(reply[1][0][0]) == 3  # its final marker still refuses it


async def test_finalize_gives_back_each_entry_s_own_charge(
    redis_url: str, redis_client: Any
) -> None:
    """Two entries of one request id (a copy added with raw commands) are each charged what
    their c says and each given back, though only the first gets the answer."""
    worker = FakeWorkerSide(redis_url)
    env = make_envelope(CHATS["multi-byte"], model=MODEL, max_tokens=40)
    lane = KEYS.requests(MODEL, "normal")
    async with ChatClient(redis_url) as client:
        call = enqueue_call(
            KEYS, 10_000, [(env, encode_envelope(env))], each=True, allow_unserved=True
        )
        await client._enqueue(keys=call.keys, args=call.args)
        ((_, fields),) = await redis_client.xrange(lane)
        await redis_client.xadd(lane, fields)
        await redis_client.hincrby(KEYS.backlog(MODEL), "tokens", int(fields[b"c"]))
        await redis_client.hincrby(KEYS.backlog(MODEL), "requests", 1)
        (first_id, first), (second_id, second) = worker.take(), worker.take()
        assert await _charged(redis_client) == [rule(CHATS["multi-byte"], 40)] * 2
        assert worker.final(first_id, first, DONE) == 1
        assert worker.final(second_id, second, DONE) == 0  # answered once
        assert (await client.result(env.id, timeout_s=5)).text == DONE.text
    backlog = await redis_client.hgetall(KEYS.backlog(MODEL))
    assert backlog[b"tokens"] == b"0" and backlog[b"requests"] == b"0"
    assert (await redis_client.xpending(KEYS.requests(MODEL, "normal"), GROUP))["pending"] == 0
    assert STREAM_FIELD == "m" and COST_FIELD == "c" and IDEMPOTENCY_TTL_S > 0


def test_the_script_s_default_bounds_are_the_contract_s() -> None:
    match = re.search(
        r"DEFAULT_BACKLOG_TOKENS, DEFAULT_TOTAL_TOKENS, DEFAULT_MAX_MODELS = (\d+), (\d+), (\d+)",
        lua("enqueue"),
    )
    assert match is not None
    assert tuple(map(int, match.groups())) == tuple(bounds_fields(DEFAULT_BOUNDS).values())


async def test_the_bounds_in_redis_hold_whatever_the_client_asks(
    redis_url: str, redis_client: Any
) -> None:
    """One client pushed a model to 2.4x the bound with max_backlog_tokens=10**12 when the
    bound was a client setting; now it can only lower it. A total across models and a count
    of queued models hold too, and a refused new model name leaves no key behind."""
    chat = CHATS["ascii"]
    one = rule(chat, 50)
    await write_bounds(redis_client, KEYS, QueueBounds(3 * one, 5 * one, 2))
    greedy = ClientSettings(redis_url=redis_url, max_backlog_tokens=10**12)
    async with ChatClient(settings=greedy) as client:
        for _ in range(3):
            await client.submit(chat, model="a", max_tokens=50)
        with pytest.raises(QueueFull) as info:  # the model's bound, from Redis
            await client.submit(chat, model="a", max_tokens=50)
        assert (info.value.backlog_tokens, info.value.limit_tokens) == (3 * one, 3 * one)
        for _ in range(2):
            await client.submit(chat, model="b", max_tokens=50)
        with pytest.raises(QueueFull) as info:  # the total across models
            await client.submit(chat, model="b", max_tokens=50)
        assert info.value.limit_tokens == 5 * one
        keys_before = await redis_client.dbsize()
        await write_bounds(redis_client, KEYS, QueueBounds(3 * one, 10**6, 2))
        with pytest.raises(QueueFull) as info:  # a third model name: max_models
            await client.submit(chat, model="made-up-name", max_tokens=50)
        assert info.value.limit_tokens == 2
        assert await redis_client.dbsize() == keys_before  # nothing of it stored
    async with ChatClient(redis_url, settings=ClientSettings(max_backlog_tokens=one)) as modest:
        with pytest.raises(QueueFull):  # a client may lower its own bound
            await modest.submit(chat, model="b", max_tokens=50)
    totals = await redis_client.hgetall(KEYS.totals())
    assert (int(totals[b"tokens"]), int(totals[b"models"])) == (5 * one, 2)


async def test_an_idle_model_s_bookkeeping_expires_and_leaves_the_count(
    redis_url: str, redis_client: Any
) -> None:
    worker = FakeWorkerSide(redis_url)
    async with ChatClient(redis_url) as client:
        await client.submit(CHATS["ascii"], model=MODEL, max_tokens=5)
        assert await redis_client.ttl(KEYS.backlog(MODEL)) == -1  # busy: kept
        worker.final(*worker.take(), DONE)
    assert 0 < await redis_client.ttl(KEYS.backlog(MODEL)) <= IDLE_BACKLOG_TTL_S
    totals = await redis_client.hgetall(KEYS.totals())
    assert (totals[b"tokens"], totals[b"models"]) == (b"0", b"0")
    assert re.search(rf"'EXPIRE', backlog, {IDLE_BACKLOG_TTL_S}\)", lua("finalize_lib"))


async def test_with_partitions_each_enforces_its_share_of_the_bounds(
    redis_url: str, redis_client: Any
) -> None:
    """Bounds written once land in every partition; each partition admits ceil(bound / P)."""
    chat = CHATS["ascii"]
    one = rule(chat, 50)
    two = Keys(partitions=2)
    await write_bounds(redis_client, two, QueueBounds(4 * one, 10**9, 256))
    for p in range(2):
        assert int(await redis_client.hget(two.bounds(p), "backlog_tokens")) == 4 * one
    async with ChatClient(redis_url, partitions=2, allow_unserved=True) as client:
        in_0 = [rid for rid in (f"p0-{i}" for i in range(100)) if two.partition_of(rid) == 0]
        for rid in in_0[:2]:  # partition 0 holds 2 requests: its share of the bound (4 / 2)
            await client.submit(chat, model="a", max_tokens=50, request_id=rid)
        rid = in_0[2]
        with pytest.raises(QueueFull) as info:
            await client.submit(chat, model="a", max_tokens=50, request_id=rid)
        assert info.value.limit_tokens == 2 * one
        other = next(f"y{i}" for i in range(100) if two.partition_of(f"y{i}") == 1)
        await client.submit(chat, model="a", max_tokens=50, request_id=other)  # room there
