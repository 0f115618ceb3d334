"""ChatClient / SyncChatClient against a real Redis; the test plays the worker by writing
results exactly as a worker does (result entries + the FINALIZE script)."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
import redis

from producer import (
    ChatClient,
    ClientSettings,
    ProtocolError,
    QueueFull,
    RedisUnavailable,
    RequestFailed,
    ResultTimeout,
    SyncChatClient,
)
from producer.calls import FALLBACK_RETRY_AFTER_S, MAX_RETRY_AFTER_S, retry_after_s
from producer.keys import GROUP, IDEMPOTENCY_TTL_S, STREAM_FIELD, Keys
from producer.protocol import (
    Chunk,
    Done,
    Envelope,
    Error,
    Timings,
    Usage,
    decode_envelope,
    encode_result,
    estimate_cost_tokens,
)
from producer.scripts import FINALIZE

MODEL = "tiny-chat"
KEYS = Keys()
MESSAGES = [
    {"role": "system", "content": "You are a helpful support agent."},
    {"role": "user", "content": "Where is my order 1234?"},
]


class FakeWorkerSide:
    """Reads queued entries and writes results the way the aggregator does (real Redis)."""

    def __init__(self, url: str) -> None:
        self.redis: Any = redis.Redis.from_url(url)
        self.finalize: Any = self.redis.register_script(FINALIZE)

    def take(self, priority: str = "normal") -> tuple[bytes, Envelope]:
        stream = KEYS.requests(MODEL, priority)
        # The worker creates the group at id 0, so entries queued before it are delivered.
        try:
            self.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
        except redis.ResponseError as err:
            assert "BUSYGROUP" in str(err)
        reply = self.redis.xreadgroup(GROUP, "w1", {stream: ">"}, count=1)
        entry_id, fields = reply[0][1][0]
        return entry_id, decode_envelope(fields[STREAM_FIELD.encode()])

    def chunk(self, request_id: str, index: int, delta: str) -> None:
        self.redis.xadd(KEYS.result(request_id), encode_result(Chunk(index, delta)))

    def final(self, entry_id: bytes, env: Envelope, entry: Done | Error) -> int:
        fields = encode_result(entry)
        keys = [
            KEYS.result(env.id),
            KEYS.final(env.id),
            KEYS.requests(env.model, env.priority),
            KEYS.backlog(env.model),
        ]
        kind = fields["t"].decode()
        args = [GROUP, entry_id, kind, fields["m"], 3600, estimate_cost_tokens(env)]
        return int(self.finalize(keys=keys, args=args))


DONE = Done(
    text="It ships tomorrow.",
    finish_reason="stop",
    usage=Usage(prompt_tokens=20, completion_tokens=5),
    timings=Timings(queued_ms=1.5, first_token_ms=12.0, total_ms=30.0, engine_ms=27.5),
    worker="w1",
)


async def test_submit_then_result_round_trip(redis_url: str, redis_client: Any) -> None:
    worker = FakeWorkerSide(redis_url)
    async with ChatClient(redis_url) as client:
        request_id = await client.submit(MESSAGES, model=MODEL, max_tokens=32, seed=7)
        stream = KEYS.requests(MODEL, "normal")
        assert await redis_client.xlen(stream) == 1
        entry_id, env = worker.take()
        assert env.id == request_id and env.params.max_tokens == 32 and env.params.seed == 7
        cost = estimate_cost_tokens(env)
        backlog = await redis_client.hgetall(KEYS.backlog(MODEL))
        assert int(backlog[b"tokens"]) == cost and int(backlog[b"requests"]) == 1
        assert await redis_client.smembers(KEYS.models) == {MODEL.encode()}

        # result() blocks on XREAD and wakes when the final arrives.
        waiter = asyncio.create_task(client.result(request_id, timeout_s=5))
        await asyncio.sleep(0.1)
        assert not waiter.done()
        assert worker.final(entry_id, env, DONE) == 1
        result = await waiter
    assert result.id == request_id and result.text == DONE.text
    assert result.finish_reason == "stop" and result.worker == "w1"
    assert result.usage == DONE.usage
    assert (result.queued_ms, result.first_token_ms, result.total_ms) == (1.5, 12.0, 30.0)
    assert result.engine_ms == 27.5
    # FINALIZE gave the backlog back and removed the entry.
    backlog = await redis_client.hgetall(KEYS.backlog(MODEL))
    assert int(backlog[b"tokens"]) == 0 and int(backlog[b"requests"]) == 0
    assert await redis_client.xlen(stream) == 0


async def test_chat_is_submit_plus_result(redis_url: str) -> None:
    worker = FakeWorkerSide(redis_url)

    def answer() -> None:
        time.sleep(0.1)
        entry_id, env = worker.take("high")
        worker.final(entry_id, env, DONE)

    thread = threading.Thread(target=answer)
    thread.start()
    async with ChatClient(redis_url) as client:
        result = await client.chat(MESSAGES, model=MODEL, priority="high", timeout_s=5)
    thread.join()
    assert result.text == DONE.text


async def test_idempotent_submit_returns_same_id_and_one_entry(
    redis_url: str, redis_client: Any
) -> None:
    async with ChatClient(redis_url) as client:
        first = await client.submit(MESSAGES, model=MODEL, idempotency_key="order-1234-q1")
        second = await client.submit(MESSAGES, model=MODEL, idempotency_key="order-1234-q1")
        other = await client.submit(MESSAGES, model=MODEL, idempotency_key="order-1234-q2")
    assert first == second != other
    assert await redis_client.xlen(KEYS.requests(MODEL, "normal")) == 2
    assert await redis_client.get(KEYS.idempotency("order-1234-q1")) == first.encode()
    assert 0 < await redis_client.ttl(KEYS.idempotency("order-1234-q1")) <= IDEMPOTENCY_TTL_S
    assert int(await redis_client.hget(KEYS.backlog(MODEL), "requests")) == 2


async def test_queue_full_retry_after_follows_measured_rate(
    redis_url: str, redis_client: Any
) -> None:
    settings = ClientSettings(redis_url=redis_url, max_backlog_tokens=1000)
    async with ChatClient(settings=settings) as client:
        await client.submit(MESSAGES, model=MODEL, max_tokens=600)
        queued = int(await redis_client.hget(KEYS.backlog(MODEL), "tokens"))

        # No drain rate measured yet: the fallback.
        with pytest.raises(QueueFull) as info:
            await client.submit(MESSAGES, model=MODEL, max_tokens=600, idempotency_key="k")
        assert info.value.retry_after_s == FALLBACK_RETRY_AFTER_S
        assert info.value.backlog_tokens == queued and info.value.limit_tokens == 1000
        # Refused: nothing queued, the idempotency key is free for the retry.
        assert await redis_client.xlen(KEYS.requests(MODEL, "normal")) == 1
        assert await redis_client.get(KEYS.idempotency("k")) is None

        # A measured rate of 100 tokens/s: the excess over the bound drains in excess/100 s.
        await redis_client.hset(KEYS.backlog(MODEL), "rate", "100.0")
        with pytest.raises(QueueFull) as info:
            await client.submit(MESSAGES, model=MODEL, max_tokens=600)
        cost = queued  # same messages and max_tokens: same cost
        assert info.value.retry_after_s == pytest.approx((queued + cost - 1000) / 100.0)

        # A tiny rate is clamped.
        await redis_client.hset(KEYS.backlog(MODEL), "rate", "0.001")
        with pytest.raises(QueueFull) as info:
            await client.submit(MESSAGES, model=MODEL, max_tokens=600)
        assert info.value.retry_after_s == MAX_RETRY_AFTER_S

        # A small request still fits.
        await client.submit(MESSAGES, model=MODEL, max_tokens=50)


def test_retry_after_formula_bounds() -> None:
    assert retry_after_s(900, 200, 1000, 50.0) == pytest.approx(2.0)
    assert retry_after_s(900, 200, 1000, 1e9) == 0.05
    assert retry_after_s(900, 200, 1000, 0.0) == FALLBACK_RETRY_AFTER_S
    assert retry_after_s(10**9, 200, 1000, 1.0) == 60.0


async def test_rate_measured_by_finalize_feeds_retry_after(
    redis_url: str, redis_client: Any
) -> None:
    worker = FakeWorkerSide(redis_url)
    settings = ClientSettings(redis_url=redis_url, max_backlog_tokens=400)
    async with ChatClient(settings=settings) as client:
        for _ in range(2):
            await client.submit(MESSAGES, model=MODEL, max_tokens=300)
            entry_id, env = worker.take()
            worker.final(entry_id, env, DONE)
            await asyncio.sleep(1.05)  # FINALIZE measures the rate over >= 1 s windows
        rate = float(await redis_client.hget(KEYS.backlog(MODEL), "rate"))
        assert 200 < rate < 700  # two requests' cost (~2 x 330 tokens) over ~1.05 s
        await client.submit(MESSAGES, model=MODEL, max_tokens=300)
        with pytest.raises(QueueFull) as info:
            await client.submit(MESSAGES, model=MODEL, max_tokens=300)
    cost = estimate_cost_tokens(env)
    assert info.value.retry_after_s == pytest.approx((2 * cost - 400) / rate)


async def test_empty_backlog_admits_a_request_larger_than_the_bound(redis_url: str) -> None:
    settings = ClientSettings(redis_url=redis_url, max_backlog_tokens=100)
    async with ChatClient(settings=settings) as client:
        await client.submit(MESSAGES, model=MODEL, max_tokens=500)
        with pytest.raises(QueueFull):
            await client.submit(MESSAGES, model=MODEL, max_tokens=1)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_tokens": 0}, "params.max_tokens"),
        ({"temperature": -1.0}, "params.temperature"),
        ({"priority": "urgent"}, "priority"),
        ({"stop": 5}, "stop"),
        ({"model": "bad model!"}, "model"),
        ({"deadline_s": -1}, "deadline_s"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
        ({"messages": []}, "messages"),
    ],
)
async def test_bad_input_raises_protocol_error_before_redis(
    redis_url: str, redis_client: Any, kwargs: dict[str, Any], field: str
) -> None:
    call: dict[str, Any] = {"messages": MESSAGES, "model": MODEL, **kwargs}
    async with ChatClient(redis_url) as client:
        with pytest.raises(ProtocolError) as info:
            await client.submit(call.pop("messages"), **call)
    assert info.value.field == field
    assert await redis_client.dbsize() == 0


async def test_stream_yields_chunks_in_order_and_resumes(redis_url: str) -> None:
    worker = FakeWorkerSide(redis_url)
    deltas = ["It ", "ships ", "tomorrow", "."]
    async with ChatClient(redis_url) as client:
        request_id = await client.submit(MESSAGES, model=MODEL, stream=True)
        entry_id, env = worker.take()
        assert env.stream

        def produce() -> None:
            for i, delta in enumerate(deltas):
                time.sleep(0.03)
                worker.chunk(request_id, i, delta)
            worker.final(entry_id, env, DONE)

        thread = threading.Thread(target=produce)
        thread.start()
        live = [d async for d in client.stream(request_id, timeout_s=5)]
        thread.join()
        assert live == deltas and "".join(live) == DONE.text
        # Resume after two deltas were received (e.g. the caller reconnected).
        resumed = [d async for d in client.stream(request_id, from_index=2, timeout_s=5)]
        assert resumed == deltas[2:]


async def test_stream_of_unstreamed_request_yields_final_text(redis_url: str) -> None:
    worker = FakeWorkerSide(redis_url)
    async with ChatClient(redis_url) as client:
        request_id = await client.submit(MESSAGES, model=MODEL)
        entry_id, env = worker.take()
        worker.final(entry_id, env, DONE)
        assert [d async for d in client.stream(request_id)] == [DONE.text]


async def test_error_final_raises_request_failed(redis_url: str) -> None:
    worker = FakeWorkerSide(redis_url)
    async with ChatClient(redis_url) as client:
        request_id = await client.submit(MESSAGES, model=MODEL, stream=True)
        entry_id, env = worker.take()
        worker.chunk(request_id, 0, "It ")
        error = Error(code="deadline_exceeded", message="deadline passed in the queue")
        assert worker.final(entry_id, env, error) == 1
        # A second final (e.g. a reclaimed duplicate) is not written.
        assert worker.final(entry_id, env, DONE) == 0
        with pytest.raises(RequestFailed) as info:
            await client.result(request_id, timeout_s=2)
        assert info.value.code == "deadline_exceeded"
        got: list[str] = []
        with pytest.raises(RequestFailed):
            async for delta in client.stream(request_id, timeout_s=2):
                got.append(delta)
        assert got == ["It "]


async def test_cancel_sets_marker_and_stream_entry(redis_url: str, redis_client: Any) -> None:
    worker = FakeWorkerSide(redis_url)
    async with ChatClient(redis_url) as client:
        request_id = await client.submit(MESSAGES, model=MODEL)
        assert await client.cancel(request_id) is True
        assert await redis_client.get(KEYS.cancelled(request_id)) == b"1"
        assert await redis_client.ttl(KEYS.cancelled(request_id)) > 0
        entries = await redis_client.xrange(KEYS.cancel)
        assert [fields[b"id"] for _, fields in entries] == [request_id.encode()]
        entry_id, env = worker.take()
        worker.final(entry_id, env, DONE)
        assert await client.cancel(request_id) is False  # already finished
        with pytest.raises(ProtocolError):
            await client.cancel("no spaces allowed")


async def test_result_timeout(redis_url: str) -> None:
    async with ChatClient(redis_url) as client:
        request_id = await client.submit(MESSAGES, model=MODEL)
        start = time.monotonic()
        with pytest.raises(ResultTimeout):
            await client.result(request_id, timeout_s=0.3)
        elapsed = time.monotonic() - start
        assert 0.3 <= elapsed < 1.5
        with pytest.raises(ResultTimeout):
            async for _ in client.stream(request_id, timeout_s=0.2):
                pass


async def test_blocking_reads_are_sliced_under_the_socket_timeout(redis_url: str) -> None:
    settings = ClientSettings(redis_url=redis_url, socket_timeout_s=0.2)
    async with ChatClient(settings=settings) as client:
        request_id = await client.submit(MESSAGES, model=MODEL)
        with pytest.raises(ResultTimeout):  # not redis.TimeoutError
            await client.result(request_id, timeout_s=0.7)


def test_sync_client_does_the_same(redis_url: str) -> None:
    worker = FakeWorkerSide(redis_url)
    settings = ClientSettings(redis_url=redis_url, max_backlog_tokens=1000)
    with SyncChatClient(settings=settings) as client:
        request_id = client.submit(MESSAGES, model=MODEL, stream=True, idempotency_key="s1")
        assert client.submit(MESSAGES, model=MODEL, idempotency_key="s1") == request_id
        with pytest.raises(QueueFull):
            client.submit(MESSAGES, model=MODEL, max_tokens=2000)
        with pytest.raises(ResultTimeout):
            client.result(request_id, timeout_s=0.2)

        entry_id, env = worker.take()

        def produce() -> None:
            time.sleep(0.1)
            worker.chunk(request_id, 0, "It ships ")
            worker.chunk(request_id, 1, "tomorrow.")
            worker.final(entry_id, env, DONE)

        thread = threading.Thread(target=produce)
        thread.start()
        assert list(client.stream(request_id, timeout_s=5)) == ["It ships ", "tomorrow."]
        thread.join()
        assert list(client.stream(request_id, from_index=1)) == ["tomorrow."]
        result = client.result(request_id, timeout_s=1)
        assert result.text == DONE.text and result.total_ms == 30.0
        assert client.cancel(request_id) is False

        failed_id = client.submit(MESSAGES, model=MODEL)
        entry_id, env = worker.take()
        worker.final(entry_id, env, Error(code="cancelled", message="cancelled by caller"))
        with pytest.raises(RequestFailed) as info:
            client.result(failed_id)
        assert info.value.code == "cancelled"


async def test_concurrent_submits_share_calls_but_keep_their_own_guarantees(
    redis_url: str, redis_client: Any
) -> None:
    settings = ClientSettings(redis_url=redis_url, max_backlog_tokens=1000)
    big = {"max_tokens": 180}  # cost ~200 with MESSAGES
    async with ChatClient(settings=settings) as client:
        outcomes = await asyncio.gather(
            *(client.submit(MESSAGES, model=MODEL, **big) for _ in range(7)),
            client.submit(MESSAGES, model=MODEL, max_tokens=1, idempotency_key="same"),
            client.submit(MESSAGES, model=MODEL, max_tokens=1, idempotency_key="same"),
            return_exceptions=True,
        )
    # As if enqueued one by one, in call order: big ones until the bound, then refused;
    # the small ones after them still fit; a repeated idempotency key maps to one request.
    refused = [o for o in outcomes[:7] if isinstance(o, QueueFull)]
    queued = [o for o in outcomes[:7] if isinstance(o, str)]
    assert queued and refused and outcomes[:7] == queued + refused  # type: ignore[operator]
    assert all(r.retry_after_s == FALLBACK_RETRY_AFTER_S for r in refused)
    assert isinstance(outcomes[7], str) and outcomes[7] == outcomes[8]
    tokens = int(await redis_client.hget(KEYS.backlog(MODEL), "tokens"))
    assert tokens <= 1000 < tokens + 200
    assert await redis_client.xlen(KEYS.requests(MODEL, "normal")) == len(queued) + 1
    assert int(await redis_client.hget(KEYS.backlog(MODEL), "requests")) == len(queued) + 1


async def test_many_concurrent_submits_all_land(redis_url: str, redis_client: Any) -> None:
    await redis_client.config_resetstat()
    async with ChatClient(redis_url) as client:
        ids = await asyncio.gather(
            *(client.submit(MESSAGES, model=MODEL, priority="low") for _ in range(1500))
        )
    assert len(set(ids)) == 1500
    assert await redis_client.xlen(KEYS.requests(MODEL, "low")) == 1500
    queued = {
        decode_envelope(f[b"m"]).id
        for _, f in await redis_client.xrange(KEYS.requests(MODEL, "low"))
    }
    assert queued == set(ids)
    stats = await redis_client.info("commandstats")
    calls = sum(v["calls"] for k, v in stats.items() if k in ("cmdstat_evalsha", "cmdstat_eval"))
    assert calls <= 10  # sent together (at most MAX_BATCH_REQUESTS a call), not 1,500 calls


async def test_concurrent_submits_each_see_redis_unavailable() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here once closed
    async with ChatClient(f"redis://127.0.0.1:{port}/0") as client:
        outcomes = await asyncio.gather(
            *(client.submit(MESSAGES, model=MODEL) for _ in range(5)), return_exceptions=True
        )
    assert all(isinstance(o, RedisUnavailable) for o in outcomes)
    assert len({id(o) for o in outcomes}) == 5  # one error object per caller
