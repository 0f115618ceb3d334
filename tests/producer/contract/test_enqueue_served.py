"""ENQUEUE's live check against a real Redis: a request for a model no live worker serves is
refused at once, naming the model and the served ones, and nothing is written; a client that
opts in queues it; a full queue nobody drains says so. Workers mark their model served with
the real BEAT script (``Reclaimer``), as a running worker does every beat."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from producer import ChatClient, ClientSettings, ModelNotServed, QueueFull, SyncChatClient
from producer.contract.keys import Keys
from workers.reclaim import Reclaimer

KEYS = Keys()
MESSAGES = [{"role": "user", "content": "Where is my parcel?"}]


async def _serve(redis_client: Any, model: str, name: str = "w1", ttl_s: float = 2.0) -> Reclaimer:
    rec = Reclaimer(redis_client, KEYS, name, heartbeat_ttl_s=ttl_s)
    await rec.register({"model": model, "state": "serving"})
    return rec


async def _nothing_written(redis_client: Any, model: str) -> None:
    for lane in KEYS.request_lanes(model):
        assert await redis_client.xlen(lane) == 0
    assert await redis_client.exists(KEYS.backlog(model)) == 0
    assert not await redis_client.sismember(KEYS.models(), model)


async def test_unserved_model_is_refused_naming_it_and_the_served_ones(
    redis_url: str, redis_client: Any
) -> None:
    await _serve(redis_client, "alpha")
    async with ChatClient(redis_url, allow_unserved=False) as client:
        assert await client.submit(MESSAGES, model="alpha", max_tokens=8)
        with pytest.raises(ModelNotServed) as info:
            await client.submit(MESSAGES, model="beta", max_tokens=8)
        # Concurrent submits share one ENQUEUE call: each gets its own outcome.
        both = await asyncio.gather(
            client.submit(MESSAGES, model="alpha", max_tokens=8),
            client.submit(MESSAGES, model="beta", max_tokens=8),
            return_exceptions=True,
        )
        # All or nothing: one unserved model refuses the whole batch.
        with pytest.raises(ModelNotServed):
            await client.submit_many([MESSAGES, {"messages": MESSAGES, "model": "beta"}],
                                     model="alpha", max_tokens=8)  # fmt: skip
    assert info.value.model == "beta" and info.value.served == ["alpha"]
    assert "'beta'" in str(info.value) and "served now: alpha" in str(info.value)
    assert isinstance(both[0], str) and isinstance(both[1], ModelNotServed)
    assert await redis_client.xlen(KEYS.requests("alpha", "normal")) == 2
    await _nothing_written(redis_client, "beta")
    with SyncChatClient(redis_url, allow_unserved=False) as sync:
        with pytest.raises(ModelNotServed, match="served now: alpha"):
            sync.submit(MESSAGES, model="beta", max_tokens=8)
        with pytest.raises(ModelNotServed):
            sync.submit_many([MESSAGES], model="beta", max_tokens=8)


async def test_no_worker_at_all_and_a_worker_gone(redis_url: str, redis_client: Any) -> None:
    async with ChatClient(redis_url, allow_unserved=False) as client:
        with pytest.raises(ModelNotServed, match="served now: none"):
            await client.submit(MESSAGES, model="alpha", max_tokens=8)
        rec = await _serve(redis_client, "alpha", ttl_s=0.3)
        assert await client.submit(MESSAGES, model="alpha", max_tokens=8)
        await rec.retire()
        # Its served mark lasts one heartbeat TTL (0.3 s) on Redis's clock; wait past it.
        await asyncio.sleep(0.3 + 0.2)
        with pytest.raises(ModelNotServed):
            await client.submit(MESSAGES, model="alpha", max_tokens=8)


async def test_a_draining_worker_takes_no_new_requests(redis_url: str, redis_client: Any) -> None:
    rec = Reclaimer(redis_client, KEYS, "w1", heartbeat_ttl_s=0.3)
    await rec.register({"model": "alpha", "state": "draining"})
    async with ChatClient(redis_url, allow_unserved=False) as client:
        with pytest.raises(ModelNotServed):
            await client.submit(MESSAGES, model="alpha", max_tokens=8)


async def test_opting_in_queues_for_a_model_nobody_serves(
    redis_url: str, redis_client: Any
) -> None:
    async with ChatClient(redis_url, allow_unserved=True) as client:
        rid = await client.submit(MESSAGES, model="beta", max_tokens=8)
        assert await client.submit_many([MESSAGES], model="beta", max_tokens=8)
    assert rid and await redis_client.xlen(KEYS.requests("beta", "normal")) == 2
    env = {"CHATQ_ALLOW_UNSERVED": "1"}
    assert ClientSettings.from_env(env).allow_unserved
    assert not ClientSettings.from_env({}).allow_unserved


async def test_queue_full_without_a_live_worker_says_so(redis_url: str, redis_client: Any) -> None:
    settings = ClientSettings(redis_url=redis_url, max_backlog_tokens=20, allow_unserved=True)
    async with ChatClient(settings=settings) as client:
        await client.submit(MESSAGES, model="beta", max_tokens=16)
        with pytest.raises(QueueFull) as unserved:
            await client.submit(MESSAGES, model="beta", max_tokens=16)
        with pytest.raises(QueueFull) as unserved_many:
            await client.submit_many([MESSAGES], model="beta", max_tokens=16)
        await _serve(redis_client, "alpha")
        await client.submit(MESSAGES, model="alpha", max_tokens=16)
        with pytest.raises(QueueFull) as served:
            await client.submit(MESSAGES, model="alpha", max_tokens=16)
    for err in (unserved.value, unserved_many.value):
        assert err.no_live_worker and err.model == "beta"
        assert "no live worker serves model 'beta'" in str(err) and "retry" not in str(err)
    assert not served.value.no_live_worker and "retry after" in str(served.value)
