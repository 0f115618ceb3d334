"""Logprobs through the queue: a real worker on the tiny checkpoint, checked against
transformers' log-softmax of the same model's logits (teacher-forced on CPU)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer

from gpu_engine.outputs import TokenLogprobs
from gpu_engine.sequence import SamplingParams
from producer.client import ChatClient
from producer.contract.codec import make_envelope
from producer.contract.keys import Keys
from producer.contract.logprobs import MIN_LOGPROB, TokenLogprob
from producer.contract.results import Chunk
from tests.gpu_engine.conftest import hf_model
from tests.workers.conftest import MODEL, ThreadWorker, held_by_a_dead_worker
from workers.logprobs import TokenTexts, byte_level_alphabet

pytestmark = pytest.mark.timeout(180)

KEYS = Keys()
USER = [{"role": "user", "content": "Where is my order?"}]
TOLERANCE = 1e-3  # the engine's fp32 CPU forward vs transformers'


def _ids(tokenizer: Any, entries: list[TokenLogprob]) -> list[int]:
    """Token ids back from the entries' bytes (the tiny tokenizer is byte-level BPE)."""
    chars = {b: c for c, b in byte_level_alphabet().items()}
    vocab = tokenizer.get_vocab()
    return [vocab["".join(chars[b] for b in e.bytes)] for e in entries]


def _reference(ckpt: Path, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """[len(generated), vocab] log-softmax of transformers' logits at each generated token."""
    model = hf_model(ckpt)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + generated])).logits[0].float()
    return torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)


def _check_against_reference(
    ckpt: Path, tokenizer: Any, entries: list[TokenLogprob], k: int
) -> None:
    text = tokenizer.apply_chat_template(USER, add_generation_prompt=True, tokenize=False)
    prompt = tokenizer.encode(text, add_special_tokens=False)
    generated = _ids(tokenizer, entries)
    ref = _reference(ckpt, prompt, generated)
    for i, (entry, token) in enumerate(zip(entries, generated, strict=True)):
        assert abs(entry.logprob - ref[i, token].item()) < TOLERANCE, i
        assert len(entry.top_logprobs) == k
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
        top = ref[i].topk(k)
        assert _ids(tokenizer, entry.top_logprobs) == top.indices.tolist()  # type: ignore[arg-type]
        assert max(abs(a - b) for a, b in zip(values, top.values.tolist(), strict=True)) < TOLERANCE


async def test_logprobs_match_the_reference_model(
    tiny_worker: ThreadWorker, redis_url: str, tiny_checkpoint: Callable[..., Path]
) -> None:
    """Sampled (temperature 1, so the chosen token is not always the top one): each
    token's logprob and its 5 alternatives equal the model's log-softmax."""
    ckpt = tiny_checkpoint("llama")
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    async with ChatClient(redis_url) as client:
        res = await client.chat(
            USER, model=MODEL, max_tokens=12, temperature=1.0, seed=5, ignore_eos=True,
            logprobs=5, timeout_s=60,
        )  # fmt: skip
    assert len(res.logprobs) == res.usage.completion_tokens == 12
    _check_against_reference(ckpt, tokenizer, list(res.logprobs), 5)
    chosen_is_top = [e.logprob == e.top_logprobs[0].logprob for e in res.logprobs]
    assert not all(chosen_is_top)  # sampling picked a token other than the likeliest
    assert "".join(e.token for e in res.logprobs).startswith(res.text[:1])


async def test_streamed_chunks_carry_their_tokens_logprobs(
    tiny_worker: ThreadWorker, redis_url: str
) -> None:
    async with ChatClient(redis_url) as client:
        rid = await client.submit(
            USER, model=MODEL, max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=2,
            stream=True,
        )  # fmt: skip
        items = [item async for item in client.stream_chunks(rid, timeout_s=60)]
        plain = await client.chat(USER, model=MODEL, max_tokens=10, temperature=0.0, timeout_s=60)
    chunks = [c for c in items if isinstance(c, Chunk)]
    result = items[-1]
    assert chunks and not isinstance(result, Chunk)
    streamed = [e for c in chunks for e in c.logprobs]
    for c in chunks:
        assert len(c.logprobs) == len(c.tokens)
    # The chunks' entries are the first of the final's (the last tokens may add no text,
    # then only the final has them).
    assert len(result.logprobs) == result.usage.completion_tokens == 10
    assert streamed == list(result.logprobs[: len(streamed)])
    assert all(len(e.top_logprobs) == 2 for e in result.logprobs)
    # Greedy: the chosen token is the likeliest.
    assert all(e.logprob == e.top_logprobs[0].logprob for e in result.logprobs)
    assert plain.logprobs == ()  # not asked for: none


async def test_logprobs_zero_gives_the_chosen_token_only(
    tiny_worker: ThreadWorker, redis_url: str
) -> None:
    async with ChatClient(redis_url) as client:
        res = await client.chat(
            USER, model=MODEL, max_tokens=4, temperature=0.0, logprobs=0, timeout_s=60
        )
    assert len(res.logprobs) == res.usage.completion_tokens
    assert all(e.top_logprobs == () and e.logprob <= 0 for e in res.logprobs)


class _Backend:
    """A Rust tokenizer's surface: vocabulary pieces and a decoder type."""

    def __init__(self, pieces: dict[int, str], decoder: Any) -> None:
        self.pieces, self.decoder = pieces, decoder

    def id_to_token(self, token_id: int) -> str:
        return self.pieces[token_id]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(self.pieces[i] for i in ids).replace("▁", " ")


class _Tokenizer:
    def __init__(self, backend: _Backend) -> None:
        self.backend_tokenizer = backend


def test_token_texts_give_each_tokens_own_bytes(tiny_checkpoint: Callable[..., Path]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint("llama"))
    texts = TokenTexts(tokenizer)
    for text in ("Hello world", "ünïcode ✓", "a\nb"):
        ids = tokenizer.encode(text, add_special_tokens=False)
        joined = b"".join(bytes(texts.of(t)[1]) for t in ids)
        assert joined == text.encode("utf-8")
    # SentencePiece's byte fallback pieces are one byte each; other pieces are decoded.
    from tokenizers import decoders

    sp = TokenTexts(_Tokenizer(_Backend({1: "<0xE2>", 2: "▁hi"}, decoders.ByteFallback())))
    assert sp.of(1) == ("\ufffd", (0xE2,))
    assert sp.of(2) == (" hi", tuple(b" hi"))
    entry = texts.entry(ids[0], TokenLogprobs(float("-inf"), [(ids[0], -0.5)]))
    assert entry.logprob == MIN_LOGPROB and entry.top_logprobs[0].logprob == -0.5


async def test_a_resumed_answer_takes_the_streamed_tokens_logprobs_from_its_chunks(
    tiny_worker: ThreadWorker, redis_url: str, redis_client: Any
) -> None:
    """A worker that died after streaming two chunks (a consumer with no heartbeat, its
    chunks in the result stream): the live worker claims the entry, resumes after the
    chunks' tokens, and the final's first entries are the chunks' own (marked here, so
    they can only have come from there)."""
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=2)
    async with ChatClient(redis_url) as client:
        ref_id = await client.submit(USER, model=MODEL, params=params, stream=True)
        items = [item async for item in client.stream_chunks(ref_id, timeout_s=60)]
    ref_chunks = [c for c in items if isinstance(c, Chunk)]
    ref = items[-1]
    assert len(ref_chunks) >= 3 and not isinstance(ref, Chunk)
    first = ref_chunks[0].logprobs[0]
    marked = replace(first, logprob=-1.25)
    ghost = [replace(ref_chunks[0], logprobs=(marked, *ref_chunks[0].logprobs[1:])), ref_chunks[1]]
    env = make_envelope(USER, model=MODEL, request_id="lp-resume", params=params, stream=True)
    await held_by_a_dead_worker(redis_client, env, ghost)
    async with ChatClient(redis_url) as client:
        res = await client.result(env.id, timeout_s=60)
    resumed = sum(len(c.tokens) for c in ghost)
    assert res.usage.completion_tokens == 10 and len(res.logprobs) == 10
    assert res.logprobs[0] == marked  # from the chunk, not computed again
    assert res.logprobs[1:resumed] == ref.logprobs[1:resumed]
    assert res.text == ref.text
    for got, want in zip(res.logprobs[resumed:], ref.logprobs[resumed:], strict=True):
        assert got.token == want.token and abs(got.logprob - want.logprob) < TOLERANCE
