"""The engine's sampling features end to end on a tiny checkpoint: n > 1 shares the prompt's
KV blocks (block counts asserted), stop_token_ids, logprobs, and penalties / logit bias
under asynchronous scheduling against a step-by-step reference built on the same model."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from gpu_engine import LLM, InvalidRequestError, SamplingParams
from gpu_engine.penalties import apply_logit_bias, apply_penalties, logit_bias_tensors

BLOCK = 16


@pytest.fixture(scope="module")
def llm(tiny_checkpoint: Any) -> Any:
    engine = LLM(str(tiny_checkpoint("llama")), device="cpu", kv_cache_tokens=4096)
    yield engine
    engine.close()


def test_n_copies_share_the_prompts_blocks(llm: Any) -> None:
    prompt = list(range(3, 3 + 3 * BLOCK + 5))  # three full blocks and a partial one
    before = llm.engine.stats()
    outs = llm.generate([prompt], SamplingParams(n=4, max_tokens=6, seed=1, ignore_eos=True))
    after = llm.engine.stats()
    assert len(outs) == 4 and all(len(o.token_ids) == 6 for o in outs)
    assert len({tuple(o.token_ids) for o in outs}) > 1  # independent draws (seed + i)
    # One prefill: the three copies after the first found its 3 full blocks in the prefix
    # cache and computed only the partial block's 5 tokens each.
    hits = after["prefix_cache_hit_tokens"] - before["prefix_cache_hit_tokens"]
    computed = after["computed_prompt_tokens"] - before["computed_prompt_tokens"]
    assert hits == 3 * 3 * BLOCK
    assert computed == len(prompt) + 3 * 5


def test_add_request_refuses_n_above_one(llm: Any) -> None:
    with pytest.raises(InvalidRequestError, match="n > 1"):
        llm.engine.add_request("n", [1, 2], SamplingParams(n=2))


def test_stop_token_ids_end_the_answer(llm: Any) -> None:
    free = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    [ref] = llm.generate([[5, 6, 7]], free)
    stop_at = ref.token_ids[3]
    first = ref.token_ids.index(stop_at)
    params = SamplingParams(
        max_tokens=8, temperature=0.0, ignore_eos=True, stop_token_ids=[stop_at]
    )
    [out] = llm.generate([[5, 6, 7]], params)
    assert out.token_ids == ref.token_ids[: first + 1] and out.finish_reason == "stop"
    with pytest.raises(InvalidRequestError, match="stop_token_ids"):
        llm.engine.add_request("big", [1], SamplingParams(stop_token_ids=[10**6]))


def _reference(llm: Any, prompt: list[int], params: SamplingParams) -> tuple[list[int], list]:
    """Greedy decoding one token at a time from full-sequence logits (teacher forcing, no
    KV reuse, no batching), with the documented processing written out here."""
    runner = llm.engine.model_runner
    tokens: list[int] = []
    logprobs = []
    bias = logit_bias_tensors([params.logit_bias], torch.device("cpu"))
    for _ in range(params.max_tokens):
        logits = runner.prefill_logits(prompt + tokens)[-1:].float()
        logprobs.append(torch.log_softmax(logits[0], -1))
        logits = apply_logit_bias(logits.clone(), bias)
        logits = apply_penalties(
            logits,
            [prompt],
            [tokens],
            [params.repetition_penalty],
            [params.presence_penalty],
            [params.frequency_penalty],
        )
        tokens.append(int(logits.argmax(-1)))
    return tokens, logprobs


def test_penalties_and_bias_match_the_reference_under_async_scheduling(llm: Any) -> None:
    cases = [
        SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, repetition_penalty=0.2),
        SamplingParams(
            temperature=0.0, max_tokens=10, ignore_eos=True, presence_penalty=1.5,
            frequency_penalty=0.8, logit_bias={7: 4.0},
        ),
        SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=3),
    ]  # fmt: skip
    prompts = [[11, 12, 13, 11, 12], [40, 41, 42], [90, 91, 92, 93]]
    wants = [_reference(llm, p, c) for p, c in zip(prompts, cases, strict=True)]
    outs = llm.generate(prompts, cases)  # one batch, pipelined steps
    for out, (tokens, logprobs), params in zip(outs, wants, cases, strict=True):
        assert out.token_ids == tokens
        if params.logprobs is not None:
            assert len(out.logprobs) == len(tokens)
            for lp, ref, token in zip(out.logprobs, logprobs, tokens, strict=True):
                assert abs(lp.logprob - ref[token].item()) < 1e-4
                assert [t for t, _ in lp.top] == ref.topk(3).indices.tolist()
    assert outs[0].logprobs is None
    # The penalties did change the answer (so the comparison above can fail).
    plain = llm.generate(
        prompts[:2], SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    )
    assert [o.token_ids != p.token_ids for o, p in zip(outs[:2], plain, strict=True)] == [
        True
    ] * 2, (outs, plain)


def test_a_resumed_answer_keeps_its_penalties(llm: Any) -> None:
    """Tokens generated before a resume count as output for presence / frequency (negative
    values: the answer repeats them, so counting them as prompt would change it)."""
    prompt = [21, 22, 23, 24]
    params = SamplingParams(
        temperature=0.0,
        max_tokens=10,
        ignore_eos=True,
        presence_penalty=-2.0,
        frequency_penalty=-2.0,
    )
    [whole] = llm.generate([prompt], params)
    head = whole.token_ids[:4]
    resumed = SamplingParams(
        temperature=0.0, max_tokens=6, ignore_eos=True, presence_penalty=-2.0,
        frequency_penalty=-2.0, num_resumed_tokens=4,
    )  # fmt: skip
    [rest] = llm.generate([prompt + head], resumed)
    assert head + rest.token_ids == whole.token_ids


@pytest.mark.parametrize("keyed", [False, True], ids=["generators", "keyed"])
def test_a_resumed_seeded_answer_goes_on_with_its_draws_when_keyed(
    llm: Any, keyed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keyed draws (CUDA's default; interpreted here) count a resumed request's earlier
    tokens, so its continuation is what the uninterrupted run sampled; a per-request
    generator restarts from the seed (docs/reliability.md), so there it differs."""
    from gpu_engine.kernels import INTERPRET

    if keyed and not INTERPRET:
        pytest.skip("the keyed kernels take CPU tensors only under Triton's interpreter")
    monkeypatch.setattr(llm.engine.model_runner.sampler, "keyed", keyed)
    prompt = [31, 32, 33]
    params = SamplingParams(temperature=1.5, max_tokens=16, ignore_eos=True, seed=11)
    [whole] = llm.generate([prompt], params)
    head = whole.token_ids[:6]
    resumed = SamplingParams(
        temperature=1.5, max_tokens=10, ignore_eos=True, seed=11, num_resumed_tokens=6
    )
    [rest] = llm.generate([prompt + head], resumed)
    assert (head + rest.token_ids == whole.token_ids) is keyed
