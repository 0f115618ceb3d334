"""ChatClient / SyncChatClient against a real Redis; the test plays the worker by writing
results exactly as a worker does (result entries, and the finals through FINALIZE_MANY
with the keys and arguments ``FinalBatch`` builds, the worker's own path)."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
import redis

from producer import (
    CancelOutcome,
    ChatClient,
    ChatqError,
    ClientSettings,
    ProtocolError,
    QueueFull,
    RedisUnavailable,
    RequestFailed,
    ResultTimeout,
    SyncChatClient,
)
from producer.contract.codec import decode_envelope
from producer.contract.enqueue import MAX_RETRY_AFTER_S, RETRY_JITTER, idempotency_scope
from producer.contract.envelope import Envelope
from producer.contract.finalize import FinalBatch
from producer.contract.keys import COST_FIELD, GROUP, IDEMPOTENCY_TTL_S, STREAM_FIELD, Keys
from producer.contract.results import Chunk, Done, Error, Timings, Usage, encode_result
from producer.contract.scripts import FINALIZE_MANY

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
        self.finalize_many: Any = self.redis.register_script(FINALIZE_MANY)
        self.costs: dict[bytes, int] = {}  # entry id → the cost ENQUEUE charged for it

    def take(self, priority: str = "normal") -> tuple[bytes, Envelope]:
        stream = KEYS.requests(MODEL, priority)
        # The worker creates the group at id 0, so entries queued before it are delivered.
        try:
            self.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
        except redis.ResponseError as err:
            assert "BUSYGROUP" in str(err)
        reply = self.redis.xreadgroup(GROUP, "w1", {stream: ">"}, count=1)
        entry_id, fields = reply[0][1][0]
        self.costs[entry_id] = int(fields[COST_FIELD.encode()])
        return entry_id, decode_envelope(fields[STREAM_FIELD.encode()])

    def take_when_queued(self, priority: str = "normal") -> tuple[bytes, Envelope]:
        """The next queued entry, waiting up to 30 s for the client to queue one."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                return self.take(priority)
            except IndexError:  # nothing queued yet
                time.sleep(0.01)
        raise AssertionError("nothing was queued")

    def chunk(self, request_id: str, index: int, delta: str) -> None:
        self.redis.xadd(KEYS.result(request_id), encode_result(Chunk(index, delta)))

    def final(self, entry_id: bytes, env: Envelope, entry: Done | Error) -> int:
        """FINALIZE_MANY with this one final; 1 if it wrote the final, 0 if one existed."""
        fields = encode_result(entry)
        batch = FinalBatch(KEYS)
        batch.add(
            env.id, KEYS.requests(env.model, env.priority), entry_id.decode(),
            KEYS.backlog(env.model), fields["t"].decode(), fields["m"], self.costs[entry_id],
        )  # fmt: skip
        ((keys, args),) = batch.calls()
        (wrote,) = self.finalize_many(keys=keys, args=args)
        return int(wrote)


def expected_cost(env: Envelope) -> int:
    """The backlog cost ENQUEUE charges, by the rule docs/protocol.md states: UTF-8 bytes of
    the contents / 4, + 8 per message, + max_tokens."""
    content_bytes = sum(len(m.content.encode()) for m in env.messages)
    return content_bytes // 4 + 8 * len(env.messages) + env.params.max_tokens


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
        cost = expected_cost(env)
        backlog = await redis_client.hgetall(KEYS.backlog(MODEL))
        assert int(backlog[b"tokens"]) == cost and int(backlog[b"requests"]) == 1
        assert await redis_client.smembers(KEYS.models()) == {MODEL.encode()}

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

    def answer() -> None:  # waits for the entry (no sleep-then-read race)
        entry_id, env = worker.take_when_queued("high")
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
    assert first.cancel_token and not second.cancel_token  # the replay does not hold it
    assert await redis_client.xlen(KEYS.requests(MODEL, "normal")) == 2
    record = KEYS.idempotency(idempotency_scope(MODEL, None, "order-1234-q1"))
    assert (await redis_client.get(record)).split(b" ")[0] == first.encode()
    assert 0 < await redis_client.ttl(record) <= IDEMPOTENCY_TTL_S
    assert int(await redis_client.hget(KEYS.backlog(MODEL), "requests")) == 2


def _hint(excess: float, rate: float) -> Any:
    """ENQUEUE's retry hint, as the client spreads it: excess / rate, ± the jitter."""
    return pytest.approx(excess / rate, rel=RETRY_JITTER + 0.01)


async def test_queue_full_retry_after_follows_measured_rate(
    redis_url: str, redis_client: Any
) -> None:
    settings = ClientSettings(redis_url=redis_url, max_backlog_tokens=1000)
    async with ChatClient(settings=settings) as client:
        await client.submit(MESSAGES, model=MODEL, max_tokens=600)
        queued = int(await redis_client.hget(KEYS.backlog(MODEL), "tokens"))
        cost = queued  # same messages and max_tokens: same cost

        # No drain rate measured yet: as if the whole bound drained in 30 s.
        with pytest.raises(QueueFull) as info:
            await client.submit(MESSAGES, model=MODEL, max_tokens=600, idempotency_key="k")
        assert info.value.retry_after_s == _hint(queued + cost - 1000, 1000 / 30)
        assert info.value.backlog_tokens == queued and info.value.limit_tokens == 1000
        # Refused: nothing queued, the idempotency key is free for the retry.
        assert await redis_client.xlen(KEYS.requests(MODEL, "normal")) == 1
        assert await redis_client.get(KEYS.idempotency(idempotency_scope(MODEL, None, "k"))) is None

        # A measured rate of 100 tokens/s: the excess over the bound drains in excess/100 s;
        # the next caller refused is told to wait for this one's cost to drain too.
        await redis_client.hset(KEYS.backlog(MODEL), mapping={"rate": "100.0", "promised": 0})
        hints = []
        for _ in range(3):
            with pytest.raises(QueueFull) as info:
                await client.submit(MESSAGES, model=MODEL, max_tokens=600)
            hints.append(info.value.retry_after_s)
        excess = queued + cost - 1000
        assert hints[0] == _hint(excess, 100.0)
        assert hints[2] == pytest.approx((excess + 2 * cost) / 100.0, rel=RETRY_JITTER + 0.02)

        # A tiny rate is clamped (after the jitter).
        await redis_client.hset(KEYS.backlog(MODEL), "rate", "0.001")
        with pytest.raises(QueueFull) as info:
            await client.submit(MESSAGES, model=MODEL, max_tokens=600)
        assert info.value.retry_after_s >= (1 - RETRY_JITTER) * MAX_RETRY_AFTER_S
        assert info.value.retry_after_s <= MAX_RETRY_AFTER_S

        # A small request still fits.
        await client.submit(MESSAGES, model=MODEL, max_tokens=50)


async def test_rate_measured_by_finalize_feeds_retry_after(
    redis_url: str, redis_client: Any
) -> None:
    worker = FakeWorkerSide(redis_url)
    settings = ClientSettings(redis_url=redis_url, max_backlog_tokens=400)
    async with ChatClient(settings=settings) as client:
        # A lone request that empties the backlog as it ends measures nothing (no busy
        # window: the rate is what the workers drain while busy).
        await client.submit(MESSAGES, model=MODEL, max_tokens=300)
        worker.final(*worker.take(), DONE)
        assert await redis_client.hget(KEYS.backlog(MODEL), "rate") is None
        # Two queued: the window opens at the first final and closes when the backlog is
        # empty again (the second).
        await client.submit_many([MESSAGES, MESSAGES], model=MODEL, max_tokens=300)
        entry_id, env = worker.take()
        worker.final(entry_id, env, DONE)
        await asyncio.sleep(1.05)  # FINALIZE samples windows of >= 100 ms (>= 1 s busy)
        worker.final(*worker.take(), DONE)
        rate = float(await redis_client.hget(KEYS.backlog(MODEL), "rate"))
        # FINALIZE's windows last >= 1 s (server clock): at most the two requests' cost per
        # second; how much less depends on how late the second one landed (load).
        assert 0 < rate <= 2 * expected_cost(env) / 1.0
        await redis_client.hset(KEYS.backlog(MODEL), "promised", 0)
        await client.submit(MESSAGES, model=MODEL, max_tokens=300)
        with pytest.raises(QueueFull) as info:
            await client.submit(MESSAGES, model=MODEL, max_tokens=300)
    cost = expected_cost(env)
    assert info.value.retry_after_s == _hint(2 * cost - 400, rate)


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
        ({"deadline_s": float("inf")}, "deadline_s"),  # was a bare OverflowError
        ({"deadline_s": float("nan")}, "deadline_s"),
        ({"deadline_s": 1e300}, "deadline_s"),  # named deadline_ms before
        ({"deadline_s": True}, "deadline_s"),  # was accepted as 1 s
        ({"deadline_s": "30"}, "deadline_s"),
        ({"deadline_s": 0.001}, "deadline_s"),  # certain to pass before any answer
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
        ({"messages": []}, "messages"),
        # Lone surrogates: a bare UnicodeEncodeError before, now the field is named.
        ({"messages": [{"role": "user", "content": "a\ud800b"}]}, "messages[0].content"),
        ({"tenant": "acme\udc00"}, "tenant"),
        ({"stop": ["ok", "\ud83d"]}, "params.stop[1]"),
        ({"idempotency_key": "k\ud800"}, "idempotency_key"),
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
    assert isinstance(info.value, ChatqError)
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
        token = request_id.cancel_token
        assert await client.cancel(request_id) is CancelOutcome.CANCELLED
        assert await redis_client.get(KEYS.cancelled(request_id)) == token.encode()
        assert await redis_client.ttl(KEYS.cancelled(request_id)) > 0
        entries = await redis_client.xrange(KEYS.cancel())
        assert [(f[b"id"], f[b"token"]) for _, f in entries] == [
            (request_id.encode(), token.encode())
        ]
        entry_id, env = worker.take()
        worker.final(entry_id, env, DONE)
        assert await client.cancel(str(request_id), token) is CancelOutcome.FINISHED
        with pytest.raises(ProtocolError) as info:
            await client.cancel("no spaces allowed", "t")
        assert info.value.field == "request_id"


async def test_cancel_of_an_unknown_id_writes_nothing(redis_url: str, redis_client: Any) -> None:
    """An id nobody queued: UNKNOWN (false), no marker, no cancel-stream entry. A finished
    request stays FINISHED while any of its reservation, final marker or result stream is
    left (they get one TTL at the final but expire one by one), UNKNOWN once all are gone."""
    worker = FakeWorkerSide(redis_url)
    async with ChatClient(redis_url) as client:
        outcome = await client.cancel("never-queued", "some-token")
        assert outcome is CancelOutcome.UNKNOWN and not outcome
        assert await redis_client.exists(KEYS.cancelled("never-queued")) == 0
        assert await redis_client.exists(KEYS.cancel()) == 0
        rid = await client.submit(MESSAGES, model=MODEL)
        entry_id, env = worker.take()
        worker.final(entry_id, env, DONE)
        for gone in (KEYS.reservation(rid), KEYS.final(rid)):
            await redis_client.delete(gone)  # expired first
            assert await client.cancel(rid) is CancelOutcome.FINISHED
        await redis_client.delete(KEYS.result(rid))
        assert await client.cancel(rid) is CancelOutcome.UNKNOWN
        assert await redis_client.exists(KEYS.cancelled(rid), KEYS.cancel()) == 0


async def test_result_timeout(redis_url: str) -> None:
    async with ChatClient(redis_url) as client:
        request_id = await client.submit(MESSAGES, model=MODEL)
        start = time.monotonic()
        with pytest.raises(ResultTimeout):
            await client.result(request_id, timeout_s=0.3)
        # Not before the timeout; how much later is a matter of load, not correctness.
        assert time.monotonic() - start >= 0.3
        with pytest.raises(ResultTimeout):
            async for _ in client.stream(request_id, timeout_s=0.2):
                pass


async def test_blocking_reads_are_sliced_under_the_socket_timeout(redis_url: str) -> None:
    # A socket timeout every ordinary reply meets even on a loaded machine (0.2 s did not:
    # a slow SUBMIT reply failed the test), and a wait of several of them.
    settings = ClientSettings(redis_url=redis_url, socket_timeout_s=1.0)
    async with ChatClient(settings=settings) as client:
        request_id = await client.submit(MESSAGES, model=MODEL)
        with pytest.raises(ResultTimeout):  # not redis.TimeoutError
            await client.result(request_id, timeout_s=2.5)


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
        assert client.cancel(request_id) is CancelOutcome.FINISHED
        assert client.cancel("never-queued", "t") is CancelOutcome.UNKNOWN

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
    assert all(0 < r.retry_after_s <= MAX_RETRY_AFTER_S for r in refused)
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


async def test_idempotency_keys_are_scoped_by_model_and_tenant(redis_url: str) -> None:
    """Key ``order-1`` of model A / tenant A and of model B / tenant B are two requests (one
    global key once gave B A's id: B's request dropped, B reading A's answer)."""
    async with ChatClient(redis_url) as client:
        a = await client.submit(MESSAGES, model=MODEL, tenant="a", idempotency_key="order-1")
        b = await client.submit(MESSAGES, model="other", tenant="b", idempotency_key="order-1")
        b_model = await client.submit(MESSAGES, model=MODEL, tenant="b", idempotency_key="order-1")
        anon = await client.submit(MESSAGES, model=MODEL, idempotency_key="order-1")
        again = await client.submit(MESSAGES, model=MODEL, tenant="a", idempotency_key="order-1")
    assert len({a, b, b_model, anon}) == 4 and again == a


async def test_an_idempotency_key_with_another_body_is_refused(
    redis_url: str, redis_client: Any
) -> None:
    async with ChatClient(redis_url) as client:
        first = await client.submit(MESSAGES, model=MODEL, idempotency_key="pay-1", max_tokens=9)
        for change in ({"max_tokens": 10}, {"messages": MESSAGES[:1]}, {"temperature": 0.5}):
            call: dict[str, Any] = {"messages": MESSAGES, "max_tokens": 9, **change}
            with pytest.raises(ProtocolError) as info:
                await client.submit(
                    call.pop("messages"), model=MODEL, idempotency_key="pay-1", **call
                )
            assert (info.value.code, info.value.field) == (
                "idempotency_mismatch",
                "idempotency_key",
            )
            assert str(first) not in str(info.value)  # the other request's id is not told
        # The same body (deadline and stream are not the body) is the retry it was meant for.
        same = await client.submit(
            MESSAGES, model=MODEL, idempotency_key="pay-1", max_tokens=9, deadline_s=60
        )
    assert same == first
    assert await redis_client.xlen(KEYS.requests(MODEL, "normal")) == 1


async def test_a_request_id_is_never_reused(redis_url: str, redis_client: Any) -> None:
    worker = FakeWorkerSide(redis_url)
    async with ChatClient(redis_url) as client:
        rid = await client.submit(MESSAGES, model=MODEL, request_id="order-7")
        for _ in range(2):  # queued, then answered: refused both times
            with pytest.raises(ProtocolError) as info:
                await client.submit(MESSAGES, model=MODEL, priority="high", request_id=rid)
            assert (info.value.code, info.value.field) == ("id_in_use", "request_id")
            if await redis_client.xlen(KEYS.requests(MODEL, "normal")):
                entry_id, env = worker.take()
                worker.final(entry_id, env, DONE)
        assert await redis_client.xlen(KEYS.requests(MODEL, "high")) == 0
        assert (await client.result(rid, timeout_s=5)).text == DONE.text


async def test_cancel_needs_the_request_s_token(redis_url: str, redis_client: Any) -> None:
    """Another producer's cancel of an id it read somewhere does nothing."""
    async with ChatClient(redis_url) as owner, ChatClient(redis_url) as other:
        rid = await owner.submit(MESSAGES, model=MODEL)
        for token in (None, "guess", "0" * 32):
            with pytest.raises(ProtocolError) as info:
                await other.cancel(str(rid), token)
            assert (info.value.code, info.value.field) == ("not_owner", "cancel_token")
        assert await redis_client.exists(KEYS.cancelled(rid)) == 0
        assert await redis_client.xlen(KEYS.cancel()) == 0
        with pytest.raises(ProtocolError):  # a token is needed to ask at all
            await other.cancel("never-queued")
        assert await owner.cancel(rid) is CancelOutcome.CANCELLED  # submit's id has the token
        assert await other.cancel(str(rid), rid.cancel_token)  # or pass the token


def test_sync_cancel_needs_the_token_too(redis_url: str) -> None:
    with SyncChatClient(redis_url) as client:
        rid = client.submit(MESSAGES, model=MODEL)
        with pytest.raises(ProtocolError):
            client.cancel(str(rid))
        assert client.cancel(rid) is CancelOutcome.CANCELLED
