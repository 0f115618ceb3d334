"""submit_many / results_many / chat_many (async and sync) against a real Redis; the test
plays the worker with FINALIZE_MANY, as in test_client."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from producer import (
    ChatClient,
    ClientSettings,
    ProtocolError,
    QueueFull,
    RequestFailed,
    ResultTimeout,
    SyncChatClient,
)
from producer.batch import MAX_BATCH_REQUESTS, RESULTS_WINDOW
from producer.contract.codec import decode_envelope, make_envelope
from producer.contract.enqueue import idempotency_scope
from producer.contract.envelope import Envelope
from producer.contract.results import Error
from tests.producer.test_client import DONE, KEYS, MESSAGES, MODEL, FakeWorkerSide, expected_cost


def take_when_queued(worker: FakeWorkerSide) -> tuple[bytes, Envelope]:
    """The next queued entry, waiting for the client to queue one (a worker blocks too)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            return worker.take()
        except IndexError:  # nothing queued yet
            time.sleep(0.01)
    raise AssertionError("nothing was queued")


def chat(i: int) -> list[dict[str, str]]:
    return [MESSAGES[0], {"role": "user", "content": f"Where is my order #{1000 + i}?"}]


async def test_submit_many_queues_every_request_in_order(redis_url: str, redis_client: Any) -> None:
    requests: list[Any] = [chat(i) for i in range(5)]
    requests[1] = {"messages": chat(1), "priority": "high", "max_tokens": 7, "seed": 3}
    requests[3] = {"messages": chat(3), "priority": "low", "deadline_s": 30, "stream": True}
    async with ChatClient(redis_url) as client:
        ids = await client.submit_many(requests, model=MODEL, max_tokens=16)
    assert len(set(ids)) == 5
    lanes = {p: KEYS.requests(MODEL, p) for p in ("high", "normal", "low")}
    assert [await redis_client.xlen(lanes[p]) for p in ("high", "normal", "low")] == [1, 3, 1]
    envs = {}
    for lane in lanes.values():
        for _, fields in await redis_client.xrange(lane):
            env = decode_envelope(fields[b"m"])
            envs[env.id] = env
    by_index = [envs[i] for i in ids]
    assert [e.messages[1].content for e in by_index] == [chat(i)[1]["content"] for i in range(5)]
    assert by_index[1].params.max_tokens == 7 and by_index[1].params.seed == 3
    assert by_index[0].params.max_tokens == 16 and by_index[0].priority == "normal"
    assert by_index[3].stream and by_index[3].deadline_ms is not None
    assert by_index[3].deadline_ms - by_index[3].created_ms == 30_000
    backlog = await redis_client.hgetall(KEYS.backlog(MODEL))
    assert int(backlog[b"tokens"]) == sum(expected_cost(e) for e in by_index)
    assert int(backlog[b"requests"]) == 5
    assert await redis_client.smembers(KEYS.models()) == {MODEL.encode()}


async def test_submit_many_spans_models(redis_url: str, redis_client: Any) -> None:
    async with ChatClient(redis_url) as client:
        ids = await client.submit_many(
            [chat(0), {"messages": chat(1), "model": "other-model"}, chat(2)], model=MODEL
        )
    assert len(ids) == 3
    assert await redis_client.xlen(KEYS.requests(MODEL, "normal")) == 2
    assert await redis_client.xlen(KEYS.requests("other-model", "normal")) == 1
    assert int(await redis_client.hget(KEYS.backlog("other-model"), "requests")) == 1
    assert int(await redis_client.hget(KEYS.backlog(MODEL), "requests")) == 2
    assert await redis_client.smembers(KEYS.models()) == {MODEL.encode(), b"other-model"}


@pytest.mark.parametrize(
    ("requests", "defaults", "field"),
    [
        ([MESSAGES, {"messages": MESSAGES, "max_tokens": 0}], {"model": MODEL}, "requests[1]"),
        ([MESSAGES, [{"role": "robot", "content": "x"}]], {"model": MODEL}, "requests[1]"),
        ([MESSAGES, {"messages": MESSAGES, "colour": "red"}], {"model": MODEL}, "requests[1]"),
        ([MESSAGES, {"max_tokens": 5}], {"model": MODEL}, "requests[1].messages"),
        ([MESSAGES], {}, "requests[0].model"),
        ([MESSAGES], {"model": MODEL, "colour": "red"}, "colour"),
        ([], {"model": MODEL}, "requests"),
        ([MESSAGES] * (MAX_BATCH_REQUESTS + 1), {"model": MODEL}, "requests"),
        ("hello", {"model": MODEL}, "requests"),
    ],
)
async def test_submit_many_refuses_the_batch_naming_the_bad_request(
    redis_url: str, redis_client: Any, requests: Any, defaults: dict[str, Any], field: str
) -> None:
    async with ChatClient(redis_url) as client:
        with pytest.raises(ProtocolError) as info:
            await client.submit_many(requests, **defaults)
    assert info.value.field is not None and info.value.field.startswith(field)
    assert await redis_client.xlen(KEYS.requests(MODEL, "normal")) == 0  # nothing queued


async def test_submit_many_names_the_nested_field(redis_url: str) -> None:
    async with ChatClient(redis_url) as client:
        with pytest.raises(ProtocolError) as info:
            await client.submit_many(
                [MESSAGES, MESSAGES, {"messages": MESSAGES, "temperature": 9.0}], model=MODEL
            )
    assert info.value.field == "requests[2].params.temperature"
    assert "requests[2].params.temperature" in str(info.value)


async def test_submit_many_idempotency_keys(redis_url: str, redis_client: Any) -> None:
    async with ChatClient(redis_url) as client:
        known = await client.submit(MESSAGES, model=MODEL, idempotency_key="ticket-1")
        ids = await client.submit_many(
            [
                {"messages": MESSAGES, "idempotency_key": "ticket-1"},  # known: existing id
                {"messages": chat(1), "idempotency_key": "ticket-2"},  # new
                {"messages": chat(1), "idempotency_key": "ticket-2"},  # repeated in the batch
                chat(3),
            ],
            model=MODEL,
        )
    assert ids[0] == known and ids[1] == ids[2] and len({known, ids[1], ids[3]}) == 3
    assert await redis_client.xlen(KEYS.requests(MODEL, "normal")) == 3  # known + 2 new
    record = await redis_client.get(KEYS.idempotency(idempotency_scope(MODEL, None, "ticket-2")))
    assert record.split(b" ")[0] == ids[1].encode()
    assert int(await redis_client.hget(KEYS.backlog(MODEL), "requests")) == 3


async def test_submit_many_refuses_an_idempotency_key_with_another_body(
    redis_url: str, redis_client: Any
) -> None:
    async with ChatClient(redis_url) as client:
        await client.submit(MESSAGES, model=MODEL, idempotency_key="ticket-1")
        with pytest.raises(ProtocolError) as info:  # known in Redis, other messages
            await client.submit_many(
                [chat(5), {"messages": chat(0), "idempotency_key": "ticket-1"}], model=MODEL
            )
        assert (info.value.code, info.value.field) == (
            "idempotency_mismatch",
            "requests[1].idempotency_key",
        )
        with pytest.raises(ProtocolError) as info:  # repeated in the batch, other messages
            await client.submit_many(
                [{"messages": chat(i), "idempotency_key": "t-2"} for i in range(2)], model=MODEL
            )
        assert info.value.field == "requests[1].idempotency_key"
    assert await redis_client.xlen(KEYS.requests(MODEL, "normal")) == 1  # nothing of either


async def test_submit_many_is_all_or_nothing_under_the_backlog_bound(
    redis_url: str, redis_client: Any
) -> None:
    settings = ClientSettings(redis_url=redis_url, max_backlog_tokens=1000)
    async with ChatClient(settings=settings) as client:
        # An empty backlog admits a batch even past the bound (it could never fit otherwise).
        first = await client.submit_many([chat(i) for i in range(3)], model=MODEL, max_tokens=400)
        queued = int(await redis_client.hget(KEYS.backlog(MODEL), "tokens"))
        assert len(first) == 3 and queued > 1000
        await redis_client.hset(KEYS.backlog(MODEL), "tokens", 600)  # as if some drained
        lane = KEYS.requests(MODEL, "normal")

        batch = [
            {"messages": chat(i), "idempotency_key": f"k{i}", "max_tokens": 150} for i in range(3)
        ]
        with pytest.raises(QueueFull) as info:  # 600 + 3 x ~170 > 1000: none is queued
            await client.submit_many(batch, model=MODEL)
        assert info.value.retry_after_s > 0
        assert info.value.backlog_tokens == 600 and info.value.limit_tokens == 1000
        assert await redis_client.xlen(lane) == 3
        assert int(await redis_client.hget(KEYS.backlog(MODEL), "tokens")) == 600
        assert int(await redis_client.hget(KEYS.backlog(MODEL), "requests")) == 3
        k0 = KEYS.idempotency(idempotency_scope(MODEL, None, "k0"))
        assert await redis_client.get(k0) is None

        # retry_after_s covers the whole batch's excess at the measured rate.
        await redis_client.hset(KEYS.backlog(MODEL), mapping={"rate": "50.0", "promised": 0})
        with pytest.raises(QueueFull) as info:
            await client.submit_many(batch, model=MODEL)
        cost = sum(
            expected_cost(make_envelope(chat(i), model=MODEL, max_tokens=150)) for i in range(3)
        )
        assert info.value.retry_after_s == pytest.approx((600 + cost - 1000) / 50.0, rel=0.11)

        # Two of them fit.
        ids = await client.submit_many(batch[:2], model=MODEL)
        assert len(ids) == 2 and await redis_client.xlen(lane) == 5


async def test_results_many_one_read_for_many_streams(redis_url: str) -> None:
    worker = FakeWorkerSide(redis_url)
    n = RESULTS_WINDOW + 44  # more than one window
    async with ChatClient(redis_url) as client:
        ids = await client.submit_many([chat(i) for i in range(n)], model=MODEL)
        waiter = asyncio.create_task(client.results_many(ids, timeout_s=10))
        await asyncio.sleep(0.05)
        assert not waiter.done()

        def answer() -> None:
            for _ in range(n):
                entry_id, env = worker.take()
                worker.final(entry_id, env, DONE)

        await asyncio.to_thread(answer)
        results = await waiter
    assert [r.id for r in results] == ids
    assert all(r.text == DONE.text for r in results)


async def test_results_many_errors_and_timeouts(redis_url: str) -> None:
    worker = FakeWorkerSide(redis_url)
    async with ChatClient(redis_url) as client:
        ids = await client.submit_many([chat(i) for i in range(4)], model=MODEL)
        for i in range(3):  # the 4th stays unanswered
            entry_id, env = worker.take()
            answer = Error("deadline_exceeded", "too late") if i == 1 else DONE
            worker.final(entry_id, env, answer)

        outcomes = await client.results_many(ids, timeout_s=0.3, return_exceptions=True)
        assert [type(o).__name__ for o in outcomes] == [
            "ChatResult",
            "RequestFailed",
            "ChatResult",
            "ResultTimeout",
        ]
        failed = outcomes[1]
        assert isinstance(failed, RequestFailed) and failed.code == "deadline_exceeded"

        with pytest.raises(RequestFailed):  # the first failure, in the caller's order
            await client.results_many(ids, timeout_s=0.3)
        with pytest.raises(ResultTimeout):
            await client.results_many([ids[0], ids[3]], timeout_s=0.3)
        # The same id twice is answered twice.
        twice = await client.results_many([ids[0], ids[0]], timeout_s=1)
        assert [r.id for r in twice] == [ids[0], ids[0]]
        with pytest.raises(ProtocolError):
            await client.results_many(["not a valid id!"], timeout_s=1)


async def test_chat_many(redis_url: str) -> None:
    worker = FakeWorkerSide(redis_url)

    def answer() -> None:
        for _ in range(3):
            entry_id, env = take_when_queued(worker)
            worker.final(entry_id, env, DONE)

    thread = threading.Thread(target=answer)
    thread.start()
    async with ChatClient(redis_url) as client:
        results = await client.chat_many([chat(i) for i in range(3)], model=MODEL, timeout_s=5)
    thread.join()
    assert [r.text for r in results] == [DONE.text] * 3


def test_sync_client_has_the_bulk_methods(redis_url: str) -> None:
    worker = FakeWorkerSide(redis_url)
    with SyncChatClient(redis_url) as client:
        ids = client.submit_many([chat(i) for i in range(3)], model=MODEL, max_tokens=8)
        assert len(set(ids)) == 3
        with pytest.raises(ProtocolError) as info:
            client.submit_many([MESSAGES, {"messages": MESSAGES, "top_p": 0}], model=MODEL)
        assert info.value.field == "requests[1].params.top_p"
        for _ in range(3):
            entry_id, env = worker.take()
            worker.final(entry_id, env, DONE)
        assert [r.id for r in client.results_many(ids, timeout_s=5)] == ids

        def answer() -> None:
            for _ in range(2):
                entry_id, env = take_when_queued(worker)
                worker.final(entry_id, env, Error("cancelled", "no") if _ else DONE)

        thread = threading.Thread(target=answer)
        thread.start()
        outcomes = client.chat_many(
            [chat(0), chat(1)], model=MODEL, timeout_s=5, return_exceptions=True
        )
        thread.join()
        assert outcomes[0].text == DONE.text  # type: ignore[union-attr]
        assert isinstance(outcomes[1], RequestFailed) and outcomes[1].code == "cancelled"
