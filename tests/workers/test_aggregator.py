"""Turning engine outputs into results: result encoding, batched FINALIZE, stop strings."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gpu_engine.outputs import EngineCapacity as Capacity
from gpu_engine.sequence import RefusalReason, SamplingParams
from producer.contract.codec import encode_envelope, make_envelope
from producer.contract.keys import COST_FIELD, GROUP, STREAM_FIELD, Keys
from producer.contract.results import (
    Chunk,
    Done,
    Error,
    Timings,
    Usage,
    decode_result,
    done_body,
    encode_result,
    result_body,
    result_fields,
)
from workers.admission import Admission
from workers.aggregator import Aggregator
from workers.detokenizer import IncrementalDetokenizer, fast_decoder
from workers.engine_process import EngineProcess
from workers.engine_wire import Output, Refusal
from workers.lanes import Entry
from workers.metrics import Metrics
from workers.request import InflightRequest
from workers.results import ResultWriter

KEYS = Keys()
MODEL = "m"
LANE = KEYS.requests(MODEL, "normal")


@pytest.mark.parametrize(
    "entry",
    [
        Chunk(index=3, delta="héllo "),
        Chunk(index=4, delta="wörld", tokens=(17, 0, 31999)),
        Done(
            text="Your order ships today.",
            finish_reason="stop",
            usage=Usage(12, 5, 4),
            timings=Timings(1.5, 20.0, 90.25, 70.0),
            worker="w1",
        ),
        Error(code="cancelled", message="cancelled by the requester", worker="w1"),
    ],
)
def test_result_fields_match_the_protocol_encoder(entry: Any) -> None:
    assert result_fields(entry) == encode_result(entry)
    assert decode_result(result_fields(entry)) == entry


def test_done_body_is_the_body_of_the_same_done() -> None:
    done = Done("Hi ✓", "length", Usage(12, 5, 4), Timings(1.5, 20.0, 90.25, 0.0), "w1")
    body = done_body("Hi ✓", "length", 12, 5, 4, 1.5, 20.0, 90.25, 0.0, "w1")
    assert body == result_body(done) == encode_result(done)["m"]


async def _pending_entries(redis: Any, n: int, costs: tuple[int, ...] = ()) -> list[Entry]:
    """``n`` entries pending on consumer w1; entry i carries the charge ``costs[i]`` (its
    ``c`` field, as ENQUEUE writes it), or none."""
    await redis.xgroup_create(LANE, GROUP, id="0", mkstream=True)
    for i in range(n):
        env = make_envelope([{"role": "user", "content": "hi"}], model=MODEL, request_id=f"r{i}")
        fields = {STREAM_FIELD: encode_envelope(env)}
        if i < len(costs):
            fields[COST_FIELD] = str(costs[i]).encode()
        await redis.xadd(LANE, fields)
    res = await redis.xreadgroup(GROUP, "w1", {LANE: ">"}, count=n)
    return [Entry(LANE, eid.decode(), fields, "normal") for eid, fields in res[0][1]]


async def test_batched_finalize_writes_once_acks_all_and_isolates_failures(
    redis_client: Any,
) -> None:
    entries = await _pending_entries(redis_client, 4, costs=(30, 25, 0, 12))
    await redis_client.hset(KEYS.backlog(MODEL), mapping={"tokens": 100, "requests": 4})
    await redis_client.set(KEYS.final("r1"), "done")  # r1 was answered before
    await redis_client.set("not-a-stream", "x")
    writer = ResultWriter(redis_client, KEYS, MODEL, "w1")
    writer.chunk(entries[0], "r0", "Hel", [9, 8])
    writer.final(entries[0], "r0", Done(text="Hello", finish_reason="stop"))
    writer.final(entries[1], "r1", Done(text="again", finish_reason="stop"))
    writer.error(entries[2], "r2", "invalid_request", "bad")  # cost 0 must work
    # r3's FINALIZE fails (its lane key holds a string): XACK raises inside the script.
    writer.final(entries[3]._replace(stream="not-a-stream"), "r3", Done("x", "stop"))
    await writer.flush()
    assert writer.pending == 0
    r0 = [decode_result(f) for _, f in await redis_client.xrange(KEYS.result("r0"))]
    assert r0 == [Chunk(0, "Hel", (9, 8)), Done(text="Hello", finish_reason="stop")]
    assert await redis_client.xlen(KEYS.result("r1")) == 0  # not answered twice
    r2 = [decode_result(f) for _, f in await redis_client.xrange(KEYS.result("r2"))]
    assert r2 == [Error("invalid_request", "bad", "w1")]
    # r3's FINALIZE failed; the others in the same call still landed.
    pending = await redis_client.xpending(LANE, GROUP)
    assert pending["pending"] == 1  # r3's entry, left for a retry or a reclaim
    assert await redis_client.xlen(LANE) == 1
    # Every entry acked gives back its own charge, r1's too (its request was answered
    # before, by another entry of the same id: each entry was charged when it was queued).
    backlog = await redis_client.hgetall(KEYS.backlog(MODEL))
    assert int(backlog[b"tokens"]) == 100 - 30 - 25 and int(backlog[b"requests"]) == 1
    assert writer.finals_written == 2


async def test_finals_land_once_when_redis_lost_its_scripts_between_flushes(
    redis_client: Any,
) -> None:
    """Flushes after the first send EVALSHA without asking whether the script exists; after
    a SCRIPT FLUSH (or a restart) those calls answer NOSCRIPT, did not run, and run again."""
    entries = await _pending_entries(redis_client, 3)
    writer = ResultWriter(redis_client, KEYS, MODEL, "w1")
    writer.final(entries[0], "r0", Done(text="a", finish_reason="stop"))
    await writer.flush()
    await redis_client.script_flush()
    writer.chunk(entries[1], "r1", "b")
    writer.final(entries[1], "r1", Done(text="b", finish_reason="stop"))
    writer.dead_letter(entries[2], "test")
    await writer.flush()
    await redis_client.script_flush()
    writer.final(entries[1], "r1", Done(text="again", finish_reason="stop"))
    await writer.flush()
    r1 = [decode_result(f) for _, f in await redis_client.xrange(KEYS.result("r1"))]
    assert r1 == [Chunk(0, "b"), Done(text="b", finish_reason="stop")]
    assert writer.finals_written == 2 and writer.pending == 0
    assert (await redis_client.xpending(LANE, GROUP))["pending"] == 0
    assert await redis_client.xlen(KEYS.dead()) == 1


def _request(detok: IncrementalDetokenizer, entry: Entry, stream: bool) -> InflightRequest:
    env = make_envelope(
        [{"role": "user", "content": "hi"}],
        model=MODEL,
        request_id="r0",
        params=SamplingParams(max_tokens=64, stop=("login",)),
        stream=stream,
    )
    return InflightRequest(
        env=env,
        entry=entry,
        prompt_ids=[1, 2, 3],
        cost_tokens=67,
        level=1,
        detok=detok,
    )


async def test_stop_string_finishes_aborts_and_streams_exactly_the_answer(
    redis_client: Any, tiny_checkpoint: Callable[..., Path]
) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_checkpoint("llama"))
    (entry,) = await _pending_entries(redis_client, 1)
    admission = Admission(
        Capacity(1000, 1000, 0, 0, 0, 4), max_num_seqs=4, inflight_factor=1.0, headroom_tokens=0
    )
    # Not started: commands for the engine stay pending, where the test reads them.
    engine = EngineProcess("x:y", "", {}, on_outputs=lambda o, c: None, on_fatal=lambda m: None)
    writer = ResultWriter(redis_client, KEYS, MODEL, "w1")
    agg = Aggregator(writer, admission, engine, Metrics("w1", MODEL), "w1")
    req = _request(IncrementalDetokenizer(fast_decoder(tok), [1, 2, 3], ("login",)), entry, True)
    admission.admit(req)
    ids = tok("To reset your password, open the login page.", add_special_tokens=False)
    for i, token in enumerate(ids["input_ids"]):
        agg._handle(Output("r0", [token], False, None, 3, 0), 0.0)
        if i % 3 == 2:
            await writer.flush()
    await writer.flush()
    results = [decode_result(f) for _, f in await redis_client.xrange(KEYS.result("r0"))]
    final = results[-1]
    assert isinstance(final, Done) and final.finish_reason == "stop"
    assert final.text == "To reset your password, open the "
    assert "".join(r.delta for r in results[:-1] if isinstance(r, Chunk)) == final.text
    assert [r.index for r in results[:-1] if isinstance(r, Chunk)] == list(range(len(results) - 1))
    assert engine._pending == [["abort", "r0"]]  # stopped in the engine too
    assert not admission.admitted and admission.committed_tokens == 0
    # A late output for the finished request changes nothing.
    agg._handle(Output("r0", [5], True, "abort", 3, 0), 0.0)
    await writer.flush()
    assert await redis_client.xlen(KEYS.result("r0")) == len(results)


@pytest.mark.parametrize(
    ("reason", "code"),
    [
        (RefusalReason.INVALID_PROMPT, "invalid_request"),
        (RefusalReason.PROMPT_TOO_LONG, "prompt_too_long"),
        (RefusalReason.INVALID_PARAMS, "invalid_request"),
        (RefusalReason.INTERNAL, "internal"),
    ],
)
async def test_an_engine_refusal_answers_with_the_code_of_its_typed_reason(
    redis_client: Any, tiny_checkpoint: Callable[..., Path], reason: RefusalReason, code: str
) -> None:
    """The code follows the refusal's reason, never words in its message: "prompt token
    ids must be integers" is an invalid request, not a prompt that is too long."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_checkpoint("llama"))
    (entry,) = await _pending_entries(redis_client, 1)
    admission = Admission(
        Capacity(1000, 1000, 0, 0, 0, 4), max_num_seqs=4, inflight_factor=1.0, headroom_tokens=0
    )
    engine = EngineProcess("x:y", "", {}, on_outputs=lambda o, c: None, on_fatal=lambda m: None)
    writer = ResultWriter(redis_client, KEYS, MODEL, "w1")
    agg = Aggregator(writer, admission, engine, Metrics("w1", MODEL), "w1")
    admission.admit(
        _request(IncrementalDetokenizer(fast_decoder(tok), [1, 2, 3], ()), entry, False)
    )
    message = "InvalidRequestError: prompt token ids must be integers: 'float' object"
    agg._handle(Output("r0", [], True, "error", 0, 0, Refusal(reason, message)), 0.0)
    await writer.flush()
    (final,) = [decode_result(f) for _, f in await redis_client.xrange(KEYS.result("r0"))]
    assert isinstance(final, Error) and final.code == code and final.message == message
    assert not admission.admitted
