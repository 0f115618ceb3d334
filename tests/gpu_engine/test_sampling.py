"""Sampler: greedy rows, top-k / top-p masks, seeded requests, distribution; the keyed
sampling kernels against the torch path."""

from __future__ import annotations

import pytest
import torch

from gpu_engine.kernels import INTERPRET
from gpu_engine.sampling import Sampler, apply_top_k_top_p
from gpu_engine.sequence import InvalidRequestError, RefusalReason, SamplingParams


@pytest.fixture(params=[False, True], ids=["generators", "keyed"])
def keyed(request: pytest.FixtureRequest) -> bool:
    """Each sampler test runs with both sources of random draws (the keyed kernels run under
    Triton's interpreter on the CPU; the GPU tests below run them compiled)."""
    if request.param and not INTERPRET:
        pytest.skip("the keyed kernels take CPU tensors only under Triton's interpreter")
    return bool(request.param)


def test_top_k_and_top_p_masks() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4]]))
    kept = apply_top_k_top_p(logits, [2, 0], [1.0, 1.0]).isfinite()
    assert kept.tolist() == [[True, True, False, False], [True, True, True, True]]
    # Nucleus: keep the fewest tokens whose mass reaches top_p (the best always survives).
    kept = apply_top_k_top_p(logits, [0, 0], [0.8, 0.01]).isfinite()
    assert kept.tolist() == [[True, True, False, False], [False, False, False, True]]
    kept = apply_top_k_top_p(logits, [3, 1], [0.6, 1.0]).isfinite()
    assert kept.tolist() == [[True, True, False, False], [False, False, False, True]]


def test_greedy_rows_take_the_argmax_in_a_mixed_batch(keyed: bool) -> None:
    sampler = Sampler(torch.device("cpu"), seed=0, keyed=keyed)
    logits = torch.randn(4, 50)
    params = [
        SamplingParams(temperature=0),
        SamplingParams(),
        SamplingParams(temperature=0),
        SamplingParams(top_k=1),
    ]
    out = sampler.sample(logits, params, ["a", "b", "c", "d"])
    argmax = logits.argmax(-1).tolist()
    assert out[0] == argmax[0] and out[2] == argmax[2] and out[3] == argmax[3]


def test_seeded_rows_ignore_the_rest_of_the_batch(keyed: bool) -> None:
    logits = torch.randn(3, 100)
    seeded = SamplingParams(seed=7)
    draws = []
    for engine_seed, neighbours in ((0, 1), (5, 2)):
        sampler = Sampler(torch.device("cpu"), seed=engine_seed, keyed=keyed)
        rows = torch.cat([logits[1 : 1 + neighbours], logits[:1]])
        params = [SamplingParams()] * neighbours + [seeded]
        ids = [f"n{i}" for i in range(neighbours)] + ["s"]
        draws.append([sampler.sample(rows, params, ids)[-1] for _ in range(10)])
    assert draws[0] == draws[1]


def test_sampling_follows_the_distribution(keyed: bool) -> None:
    probs = torch.tensor([0.6, 0.3, 0.1, 0.0])
    sampler = Sampler(torch.device("cpu"), seed=0, keyed=keyed)
    logits = probs.log().expand(4000, -1).contiguous()
    out = torch.tensor(sampler.sample(logits, [SamplingParams()] * 4000, ["x"] * 4000))
    freq = torch.bincount(out, minlength=4).float() / 4000
    assert torch.allclose(freq, probs, atol=0.03)
    # Temperature 0.5 sharpens: p^2 normalised.
    sharp = sampler.sample(logits, [SamplingParams(temperature=0.5)] * 4000, ["x"] * 4000)
    freq = torch.bincount(torch.tensor(sharp), minlength=4).float() / 4000
    want = probs**2 / (probs**2).sum()
    assert torch.allclose(freq, want, atol=0.03)
    # A grammar mask (token 1 not allowed) renormalises what is left; many rows of a small
    # vocabulary also check the interpreter's tile (rows per program x mask words read).
    mask = torch.full((4000, 1), 0b1101, dtype=torch.int32)
    masked = sampler.sample_async(logits, [SamplingParams()] * 4000, ["x"] * 4000, None, mask)
    freq = torch.bincount(masked.tokens, minlength=4).float() / 4000
    assert torch.allclose(freq, torch.tensor([0.6, 0.0, 0.1, 0.0]) / 0.7, atol=0.03)


def test_sampling_params_validation() -> None:
    assert SamplingParams(stop="x").stop == ("x",)
    assert SamplingParams(top_k=-1).top_k == 0
    for bad in (
        dict(max_tokens=0),
        dict(temperature=-1.0),
        dict(top_p=0.0),
        dict(top_k=-2),
        dict(stop=[""]),
    ):
        with pytest.raises(InvalidRequestError) as info:
            SamplingParams(**bad)  # type: ignore[arg-type]
        assert info.value.reason is RefusalReason.INVALID_PARAMS


# --- min_p, top-k, top-p, logprobs and the sampler's processing order vs references -------


def test_min_p_top_k_top_p_match_transformers_warpers() -> None:
    from transformers import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    from gpu_engine.sampling import apply_min_p

    logits = torch.randn(3, 80) * 2
    for min_p in (0.05, 0.3):
        want = MinPLogitsWarper(min_p)(None, logits.clone())
        got = apply_min_p(logits, [min_p] * 3)
        assert torch.equal(got.isfinite(), want.isfinite())
    for k in (1, 7):
        want = TopKLogitsWarper(k)(None, logits.clone())
        assert torch.equal(
            apply_top_k_top_p(logits, [k] * 3, [1.0] * 3).isfinite(), want.isfinite()
        )
    for p in (0.3, 0.9):
        want = TopPLogitsWarper(p)(None, logits.clone())
        got = apply_top_k_top_p(logits, [0] * 3, [p] * 3)
        assert torch.equal(got.isfinite(), want.isfinite())


def test_min_p_rows_sample_only_kept_tokens(keyed: bool) -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(2000, -1).contiguous()
    sampler = Sampler(torch.device("cpu"), seed=0, keyed=keyed)
    out = sampler.sample(logits, [SamplingParams(min_p=0.4)] * 2000, ["m"] * 2000)
    freq = torch.bincount(torch.tensor(out), minlength=4).float() / 2000
    # 0.15 and 0.05 are below 0.4 * 0.5: only the first two remain, renormalised.
    assert freq[2] == 0 and freq[3] == 0
    assert abs(freq[0].item() - 0.5 / 0.8) < 0.04


def test_logprobs_are_the_models_log_softmax_with_top_alternatives(keyed: bool) -> None:
    logits = torch.randn(3, 50)
    sampler = Sampler(torch.device("cpu"), seed=0, keyed=keyed)
    params = [
        SamplingParams(logprobs=5),
        SamplingParams(temperature=0, logprobs=0),
        SamplingParams(),
    ]
    sampled = sampler.sample_async(logits, params, ["a", "b", "c"])
    want = torch.log_softmax(logits.double(), dim=-1)
    chosen = want.gather(1, sampled.tokens[:, None])[:, 0]
    torch.testing.assert_close(sampled.logprobs.double(), chosen, atol=1e-5, rtol=0)
    top = want.topk(5, dim=-1)
    assert sampled.top_ids is not None and sampled.top_logprobs is not None
    assert torch.equal(sampled.top_ids, top.indices)
    torch.testing.assert_close(sampled.top_logprobs.double(), top.values, atol=1e-5, rtol=0)


def test_greedy_rows_pick_after_bias_and_penalties(keyed: bool) -> None:
    from gpu_engine.sampling import History

    logits = torch.zeros(2, 10)
    logits[:, 4] = 3.0
    logits[:, 6] = 2.0
    sampler = Sampler(torch.device("cpu"), seed=0, keyed=keyed)
    params = [
        SamplingParams(temperature=0, logit_bias={6: 2.0}),
        SamplingParams(temperature=0, frequency_penalty=2.0),
    ]
    histories = [History([1], []), History([1], [4])]  # row 1 generated token 4 once
    # Row 0: 6 gets 2 + 2 > 3. Row 1: 4 gets 3 - 2 < 2.
    assert sampler.sample(logits, params, ["a", "b"], histories) == [6, 6]
    with pytest.raises(ValueError, match="history"):
        sampler.sample(logits, params, ["a", "b"])


def test_new_params_are_checked() -> None:
    for bad in (
        {"presence_penalty": 2.5},
        {"frequency_penalty": -3},
        {"repetition_penalty": 0},
        {"min_p": 1.5},
        {"logprobs": 21},
        {"n": 0},
        {"logit_bias": {3: 101}},
        {"logit_bias": {-1: 1}},
        {"stop_token_ids": [-5]},
    ):
        with pytest.raises(InvalidRequestError) as info:
            SamplingParams(**bad)
        assert info.value.reason is RefusalReason.INVALID_PARAMS
        assert next(iter(bad)) in str(info.value)
    assert SamplingParams(logit_bias={"7": 1, 2: -3}).logit_bias == ((2, -3.0), (7, 1.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "device",
    [
        pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRET, reason="compiled Triton")),
        pytest.param("cuda", marks=pytest.mark.gpu),
    ],
)
def test_the_keyed_kernel_picks_what_the_torch_path_picks_from_the_same_keys(
    dtype: torch.dtype, device: str
) -> None:
    """sample_keyed (grammar mask, ids past the mask, temperature, greedy rows, in one
    kernel) against apply_bitmask, softmax and the race with exponential_keyed's E."""
    from gpu_engine.grammar import apply_bitmask
    from gpu_engine.kernels.sampling import exponential_keyed, sample_keyed

    gen = torch.Generator().manual_seed(3)
    rows, vocab, mask_vocab = 12, 300, 270  # 9 mask words: ids 288.. are past the mask
    logits = torch.randn(rows, vocab, generator=gen) * 2
    logits[1:3, 295] = 50.0  # an id past the mask, far ahead of the rest
    keys = torch.randint(-(2**62), 2**62, (rows,), generator=gen)
    temperature = torch.rand(rows, generator=gen) + 0.3
    greedy = torch.arange(rows) % 4 == 0
    words = (mask_vocab + 31) // 32
    mask = torch.randint(-(2**31), 2**31 - 1, (rows, words), dtype=torch.int32, generator=gen)
    mask[1] = -1  # no grammar on row 1: the ids past the mask stay allowed there
    logits, keys, temperature, greedy, mask = (
        t.to(device) for t in (logits.to(dtype), keys, temperature, greedy, mask)
    )
    masked = apply_bitmask(logits.float(), mask)
    race = (masked / temperature[:, None]).softmax(-1) / exponential_keyed(keys, vocab)
    want = torch.where(greedy, masked.argmax(-1), race.argmax(-1))
    got = sample_keyed(logits, keys, temperature, greedy, mask)
    assert got.tolist() == want.tolist()
    assert got[1] == 295 and got[2] != 295  # row 2 has a grammar: past the mask is out
    allowed = (mask[torch.arange(rows), got.clamp(max=287) // 32] >> (got % 32)) & 1
    assert all(allowed[r] == 1 for r in range(rows) if r != 1)
    # The same keys give the same picks; other keys other picks (not every row greedy).
    assert sample_keyed(logits, keys, temperature, greedy, mask).tolist() == got.tolist()
    assert sample_keyed(logits, keys + 1, temperature, greedy, mask).tolist() != got.tolist()
    # Greedy without keys: the masked argmax.
    assert sample_keyed(logits, None, None, None, mask).tolist() == masked.argmax(-1).tolist()


@pytest.mark.gpu
def test_cuda_sampler_matches_the_cpu_reference() -> None:
    """Every logit adjustment on CUDA against the same computation on the CPU: greedy picks
    after bias, penalties and a grammar mask; logprobs; min_p / top-k / top-p masks."""
    from gpu_engine.sampling import History, apply_min_p

    cuda = torch.device("cuda")
    logits = torch.randn(4, 300) * 3
    mask = torch.randint(-(2**31), 2**31 - 1, (4, (300 + 31) // 32), dtype=torch.int32)
    params = [
        SamplingParams(temperature=0, logit_bias={5: 20.0}, logprobs=4),
        SamplingParams(temperature=0, presence_penalty=1.5, frequency_penalty=0.5),
        SamplingParams(temperature=0, repetition_penalty=1.7),
        SamplingParams(temperature=0, logprobs=0),
    ]
    histories = [
        History([1, 2], [3]),
        History([4], [7, 7, 9]),
        History([10, 11], [12]),
        History([0], []),
    ]
    ids = ["a", "b", "c", "d"]
    cpu = Sampler(torch.device("cpu"), seed=0).sample_async(logits, params, ids, histories, mask)
    gpu = Sampler(cuda, seed=0).sample_async(logits.to(cuda), params, ids, histories, mask.to(cuda))
    assert gpu.tokens.tolist() == cpu.tokens.tolist()
    assert cpu.logprobs is not None and gpu.logprobs is not None
    torch.testing.assert_close(gpu.logprobs.cpu(), cpu.logprobs, atol=1e-4, rtol=0)
    assert gpu.top_ids is not None and cpu.top_ids is not None
    assert torch.equal(gpu.top_ids.cpu(), cpu.top_ids)
    kept_cpu = apply_min_p(
        apply_top_k_top_p(logits, [5, 0, 50, 0], [1.0, 0.7, 0.9, 1.0]), [0.0, 0.1, 0.0, 0.3]
    )
    kept_gpu = apply_min_p(
        apply_top_k_top_p(logits.to(cuda), [5, 0, 50, 0], [1.0, 0.7, 0.9, 1.0]),
        [0.0, 0.1, 0.0, 0.3],
    )
    assert torch.equal(kept_gpu.isfinite().cpu(), kept_cpu.isfinite())


def test_the_sampler_leaves_its_input_alone_in_either_dtype(keyed: bool) -> None:
    from gpu_engine.sampling import History

    params = [SamplingParams(temperature=0, logit_bias={1: 50.0}, presence_penalty=1.0)] * 2
    histories = [History([0], [1])] * 2
    mask = torch.full((2, 1), -1, dtype=torch.int32)
    mask[1, 0] = ~(1 << 1)  # row 1 may not pick token 1
    for dtype in (torch.float32, torch.bfloat16):
        logits = torch.randn(2, 20).to(dtype)
        before = logits.clone()
        out = Sampler(torch.device("cpu"), seed=0, keyed=keyed).sample(
            logits, params, ["a", "b"], histories, mask
        )
        assert torch.equal(logits, before)
        assert out[0] == 1 and out[1] != 1


def test_the_warm_up_compiles_the_keyed_kernels_and_is_a_no_op_otherwise(
    keyed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A keyed sampler runs each keyed kernel variant once at warm-up (the model's dtype and
    fp32, random and greedy, with and without a mask: interpreted here); a generator sampler
    runs none."""
    from gpu_engine.kernels import sampling as kernels

    calls: list[tuple[bool, bool, torch.dtype]] = []
    real = kernels.sample_keyed

    def counted(logits, keys, temperature, greedy, bitmask):  # type: ignore[no-untyped-def]
        calls.append((keys is not None, bitmask is not None, logits.dtype))
        return real(logits, keys, temperature, greedy, bitmask)

    monkeypatch.setattr(kernels, "sample_keyed", counted)
    Sampler(torch.device("cpu"), seed=0, keyed=keyed).warm_up(300, torch.bfloat16)
    want = {(r, m, d) for r in (True, False) for m in (True, False)
            for d in (torch.bfloat16, torch.float32)}  # fmt: skip
    assert set(calls) == (want if keyed else set())


@pytest.mark.gpu
@pytest.mark.parametrize("keyed", [False, True], ids=["generators", "keyed"])
@pytest.mark.parametrize("seeded", [False, True], ids=["engine-stream", "seeded"])
def test_cuda_sampling_follows_the_distribution(keyed: bool, seeded: bool) -> None:
    """Compiled on the GPU (one row per program), both sources of draws sample softmax(l / T),
    with and without a grammar mask, from the engine's stream and from per-request seeds."""
    cuda = torch.device("cuda")
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1, 0.0] + [0.0] * 27)
    n = 20_000
    logits = probs.log().expand(n, -1).contiguous().to(cuda, torch.bfloat16)
    sampler = Sampler(cuda, seed=0, keyed=keyed)
    ids = [f"r{i}" for i in range(n)]
    params = [SamplingParams(temperature=0.5, seed=i if seeded else None) for i in range(n)]
    mask = torch.full((n, 1), 0b1101, dtype=torch.int32, device=cuda)  # token 1 not allowed
    for bitmask, allowed in ((None, [1, 1, 1, 1]), (mask, [1, 0, 1, 1])):
        out = sampler.sample_async(logits, params, ids, None, bitmask).tokens.cpu()
        want = probs[:4] ** 2 * torch.tensor(allowed)
        freq = torch.bincount(out, minlength=32).float() / n
        assert freq[4:].sum() == 0
        torch.testing.assert_close(freq[:4], want / want.sum(), atol=0.015, rtol=0)
