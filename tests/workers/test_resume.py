"""Resuming a half-finished streamed answer: the resume point read back from a result
stream, and kill -9 of the worker holding a long streamed answer, again and again."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from typing import Any

import redis

from producer.contract.keys import GROUP, Keys
from producer.contract.results import Chunk, Done, Error, decode_result, encode_result
from producer.sync_client import SyncChatClient
from tests.workers.conftest import MODEL, WorkerProcess
from workers.resume import AnswerPoint, ResumePoint, resume_point

KEYS = Keys()
USER = [{"role": "user", "content": "Tell me a long story about a lighthouse."}]


def _stream(*entries: Any) -> list[tuple[bytes, dict[str, bytes]]]:
    return [(f"{i}-0".encode(), encode_result(e)) for i, e in enumerate(entries)]  # type: ignore[misc]


def test_resume_point_joins_the_chunks_tokens_and_text() -> None:
    point = resume_point(_stream(Chunk(0, "Hel", (5, 6)), Chunk(1, "", (7,)), Chunk(2, "lo", (8,))))
    assert point == ResumePoint(next_index=3, token_ids=[5, 6, 7, 8], text="Hello")
    assert resume_point([]) is None


def test_resume_point_keeps_each_answers_tokens_and_text() -> None:
    """n > 1: the answers' chunks interleave in one stream; each answer's part is its own."""
    stream = _stream(
        Chunk(0, "A", (1,)), Chunk(1, "x", (7,), choice=1), Chunk(2, "B", (2, 3)),
        Chunk(3, "y", (8,), choice=1), Chunk(4, "z", (9,), choice=2),
    )  # fmt: skip
    point = resume_point(stream)
    assert point is not None and point.next_index == 5
    assert point.answer(0) == AnswerPoint([1, 2, 3], "AB")
    assert point.answer(1) == AnswerPoint([7, 8], "xy")
    assert point.answer(2) == AnswerPoint([9], "z")
    assert point.answer(3) == AnswerPoint([], "")  # no chunk yet


def test_resume_point_stops_at_a_gap_a_final_or_chunks_without_tokens() -> None:
    gap = _stream(Chunk(0, "a", (1,)), Chunk(2, "c", (3,)))
    assert resume_point(gap) == ResumePoint(1, [1], "a")
    final = _stream(Chunk(0, "a", (1,)), Done("a", "stop"), Chunk(1, "b", (2,)))
    assert resume_point(final) == ResumePoint(1, [1], "a")
    # An older worker's chunks carry no token ids: nothing to continue from.
    assert resume_point(_stream(Chunk(0, "a"))) is None
    assert resume_point(_stream(Error("internal", "x"))) is None


def _chunks(r: redis.Redis, rid: str) -> list[Chunk]:
    entries = [decode_result(f) for _, f in r.xrange(KEYS.result(rid))]
    return [e for e in entries if isinstance(e, Chunk)]


def _holder(r: redis.Redis) -> str | None:
    for lane in KEYS.request_lanes(MODEL):
        if r.exists(lane):
            rows = r.xpending_range(lane, GROUP, "-", "+", 10)
            if rows:
                return str(rows[0]["consumer"].decode())
    return None


def _wait(cond: Callable[[], Any], timeout_s: float, what: str, *procs: WorkerProcess) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.02)
    logs = "\n".join(p.log()[-2000:] for p in procs)
    raise AssertionError(f"timed out waiting for {what}\n{logs}")


def _tokens_at_least(r: redis.Redis, rid: str, n: int) -> Callable[[], bool]:
    return lambda: sum(len(c.tokens) for c in _chunks(r, rid)) >= n


def _heartbeat(r: redis.Redis, name: str) -> dict[str, Any]:
    raw = r.get(KEYS.heartbeat(name))
    return json.loads(raw)["capacity"] if raw else {}


# ~60 s on 2 cores: three worker processes start, and two heartbeat TTLs pass.
def test_kill_9_mid_stream_twice_the_answer_resumes_without_repeating_text(
    redis_url: str, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    """The worker holding a long streamed answer is killed twice; each time another worker
    claims it (after the heartbeat TTL), continues from the tokens in its chunks, and numbers
    its chunks on. The chunks join to the final text, every token is generated once, and the
    last worker decoded only what was left."""
    max_tokens = 1500
    r = redis.Redis.from_url(redis_url)
    procs = {name: spawn_worker(redis_url, name) for name in ("wa", "wb", "wc")}
    _wait(lambda: all(r.exists(KEYS.heartbeat(n)) for n in procs), 180, "workers", *procs.values())
    with SyncChatClient(redis_url) as client:
        rid = client.submit(
            USER, model=MODEL, max_tokens=max_tokens, ignore_eos=True, seed=7, stream=True
        )
        killed: list[str] = []
        for at_tokens in (60, 400):
            holder = _wait(lambda: _holder(r) not in (None, *killed) and _holder(r), 60, "holder")
            _wait(_tokens_at_least(r, rid, at_tokens), 60, f"{at_tokens} tokens", *procs.values())
            procs[holder].proc.kill()
            killed.append(holder)
        result = client.result(rid, timeout_s=120)
    (last,) = set(procs) - set(killed)
    chunks = _chunks(r, rid)
    assert [c.index for c in chunks] == list(range(len(chunks)))  # no index twice, no gap
    assert "".join(c.delta for c in chunks) == result.text
    assert sum(len(c.tokens) for c in chunks) == max_tokens
    assert result.finish_reason == "length" and result.usage.completion_tokens == max_tokens
    assert result.worker == last
    finals = [e for _, f in r.xrange(KEYS.result(rid)) if isinstance(e := decode_result(f), Done)]
    assert len(finals) == 1
    # The last worker resumed after the tokens the second one left and decoded only the rest.
    resumed = re.findall(rf"resuming {rid} after (\d+) tokens", procs[last].log())
    assert len(resumed) == 1, procs[last].log()[-3000:]
    done_before = int(resumed[0])
    assert 400 <= done_before < max_tokens
    beat = _wait(lambda: _heartbeat(r, last).get("completed"), 10, "last worker's beat")
    assert beat and _heartbeat(r, last)["tokens_generated"] == max_tokens - done_before
    assert _heartbeat(r, last)["resumed"] == 1
