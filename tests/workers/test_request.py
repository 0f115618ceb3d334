"""Requests for n > 1 answers through a real worker (tiny checkpoint, real engine process):
one queued request, n engine sequences sharing the prompt's KV blocks, n choices."""

from __future__ import annotations

import uuid
from dataclasses import replace
from typing import Any

import pytest

from gpu_engine.sequence import SamplingParams
from producer.client import ChatClient
from producer.contract.codec import make_envelope
from producer.contract.keys import Keys
from producer.contract.results import Chunk, decode_result
from producer.errors import RequestFailed
from tests.workers.conftest import MODEL, ThreadWorker, held_by_a_dead_worker

pytestmark = pytest.mark.timeout(180)
KEYS = Keys()


def _user() -> list[dict[str, str]]:
    """A prompt no earlier request had (so only this request's first answer can have put
    its blocks in the prefix cache), a few KV blocks long."""
    return [{"role": "user", "content": f"Order {uuid.uuid4().hex}: " + "where is it? " * 12}]


async def test_n_answers_share_the_prompt_and_count_it_once(
    tiny_worker: ThreadWorker, redis_url: str
) -> None:
    user = _user()
    metrics = tiny_worker.worker.metrics
    shared_before = metrics.shared_prompt_tokens
    async with ChatClient(redis_url) as client:
        res = await client.chat(
            user, model=MODEL, n=3, max_tokens=6, temperature=1.0, seed=4, ignore_eos=True,
            timeout_s=60,
        )  # fmt: skip
        one = await client.chat(
            user, model=MODEL, max_tokens=6, temperature=1.0, seed=4, ignore_eos=True,
            timeout_s=60,
        )  # fmt: skip
    assert [c.index for c in res.choices] == [0, 1, 2]
    assert all(c.finish_reason == "length" for c in res.choices)
    assert res.text == res.choices[0].text
    assert len({c.text for c in res.choices}) > 1  # independent draws (seed + k)
    # The prompt once, every answer's tokens.
    assert res.usage.prompt_tokens == one.usage.prompt_tokens
    assert res.usage.completion_tokens == 3 * 6
    # Answers 1 and 2 took answer 0's full prompt blocks from the prefix cache (the prompt
    # is new: nothing else could have put them there); at least one token is computed.
    block = tiny_worker.settings.block_size
    full = (res.usage.prompt_tokens - 1) // block * block
    assert full >= 2 * block
    assert metrics.shared_prompt_tokens - shared_before == 2 * full
    # Answer k is the one a request for n = 1 with seed + k gives.
    assert one.text == res.choices[0].text
    async with ChatClient(redis_url) as client:
        second = await client.chat(
            user, model=MODEL, max_tokens=6, temperature=1.0, seed=5, ignore_eos=True,
            timeout_s=60,
        )  # fmt: skip
    assert second.text == res.choices[1].text


async def test_a_seeded_n_request_is_reproducible(
    tiny_worker: ThreadWorker, redis_url: str
) -> None:
    user = _user()
    options = {"model": MODEL, "n": 2, "max_tokens": 5, "temperature": 1.0, "seed": 11,
               "ignore_eos": True, "timeout_s": 60}  # fmt: skip
    async with ChatClient(redis_url) as client:
        runs = [await client.chat(user, **options) for _ in range(2)]  # type: ignore[arg-type]
    assert [c.text for c in runs[0].choices] == [c.text for c in runs[1].choices]


async def test_streamed_n_answers_interleave_with_their_index(
    tiny_worker: ThreadWorker, redis_url: str
) -> None:
    user = _user()
    async with ChatClient(redis_url) as client:
        rid = await client.submit(
            user, model=MODEL, n=2, max_tokens=8, temperature=1.0, seed=2, ignore_eos=True,
            logprobs=1, stream=True,
        )  # fmt: skip
        items = [item async for item in client.stream_chunks(rid, timeout_s=60)]
        deltas = [d async for d in client.stream(rid, timeout_s=60)]
    chunks = [c for c in items if isinstance(c, Chunk)]
    result = items[-1]
    assert not isinstance(result, Chunk)
    assert [c.index for c in chunks] == list(range(len(chunks)))  # one sequence of chunks
    assert {c.choice for c in chunks} == {0, 1}
    for choice in result.choices:
        mine = [c for c in chunks if c.choice == choice.index]
        assert "".join(c.delta for c in mine) == choice.text
        streamed = [e for c in mine for e in c.logprobs]
        assert len(choice.logprobs) == 8
        assert streamed == list(choice.logprobs[: len(streamed)])
    # stream() gives the first answer's text.
    assert "".join(deltas) == result.choices[0].text
    assert result.usage.completion_tokens == 16


async def test_cancel_of_an_n_request_answers_cancelled(
    tiny_worker: ThreadWorker, redis_url: str
) -> None:
    async with ChatClient(redis_url) as client:
        # Each answer may take max_tokens: n of them must fit the KV cache (2048 here).
        with pytest.raises(RequestFailed, match=r"3 x max_tokens \(700\)") as err:
            await client.chat(_user(), model=MODEL, n=3, max_tokens=700, timeout_s=30)
        assert err.value.code == "prompt_too_long"
        rid = await client.submit(
            _user(), model=MODEL, n=3, max_tokens=500, ignore_eos=True, stream=True
        )
        async for _ in client.stream_chunks(rid, timeout_s=60):
            break  # it runs
        assert await client.cancel(rid)
        with pytest.raises(RequestFailed) as err:
            await client.result(rid, timeout_s=30)
        assert err.value.code == "cancelled"
        # The engine let go of all three answers: a new request runs at once.
        res = await client.chat(_user(), model=MODEL, max_tokens=2, timeout_s=30)
    assert res.usage.completion_tokens >= 1


async def test_a_resumed_n_request_goes_on_answer_by_answer(
    tiny_worker: ThreadWorker, redis_url: str, redis_client: Any
) -> None:
    """A worker that died after streaming the first chunk of each of two answers (a
    consumer with no heartbeat): the live worker claims the entry and continues each answer
    from its own chunks; each answer's chunks join to its final text, nothing repeated, and
    each keeps its own chunk's logprobs (marked here)."""
    user = _user()
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=1, n=2)
    async with ChatClient(redis_url) as client:
        ref_id = await client.submit(user, model=MODEL, params=params, stream=True)
        items = [item async for item in client.stream_chunks(ref_id, timeout_s=60)]
    ref = items[-1]
    assert not isinstance(ref, Chunk)
    firsts = {}
    for c in items[:-1]:
        assert isinstance(c, Chunk)
        firsts.setdefault(c.choice, c)
    marks = {0: -1.25, 1: -1.5}
    ghost = [
        replace(c, index=i, logprobs=(replace(c.logprobs[0], logprob=marks[k]), *c.logprobs[1:]))
        for i, (k, c) in enumerate(sorted(firsts.items()))
    ]
    env = make_envelope(user, model=MODEL, request_id=f"n-resume-{uuid.uuid4().hex[:8]}",
                        params=params, stream=True)  # fmt: skip
    await held_by_a_dead_worker(redis_client, env, ghost)
    async with ChatClient(redis_url) as client:
        res = await client.result(env.id, timeout_s=60)
        chunks = [decode_result(f) for _, f in await redis_client.xrange(KEYS.result(env.id))]
    chunks = [c for c in chunks if isinstance(c, Chunk)]
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert res.usage.completion_tokens == 16
    for choice, want in zip(res.choices, ref.choices, strict=True):
        assert choice.text == want.text  # greedy: the same answer, resumed or not
        mine = [c for c in chunks if c.choice == choice.index]
        assert "".join(c.delta for c in mine) == choice.text  # nothing repeated
        assert choice.logprobs[0].logprob == marks[choice.index]  # from its own chunk
        assert len(choice.logprobs) == 8
