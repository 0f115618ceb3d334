"""Sampler: greedy rows, top-k / top-p masks, per-request generators, distribution."""

from __future__ import annotations

import pytest
import torch

from gpu_engine.sampling import Sampler, apply_top_k_top_p
from gpu_engine.sequence import InvalidRequestError, SamplingParams


def test_top_k_and_top_p_masks() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4]]))
    kept = apply_top_k_top_p(logits, [2, 0], [1.0, 1.0]).isfinite()
    assert kept.tolist() == [[True, True, False, False], [True, True, True, True]]
    # Nucleus: keep the fewest tokens whose mass reaches top_p (the best always survives).
    kept = apply_top_k_top_p(logits, [0, 0], [0.8, 0.01]).isfinite()
    assert kept.tolist() == [[True, True, False, False], [False, False, False, True]]
    kept = apply_top_k_top_p(logits, [3, 1], [0.6, 1.0]).isfinite()
    assert kept.tolist() == [[True, True, False, False], [False, False, False, True]]


def test_greedy_rows_take_the_argmax_in_a_mixed_batch() -> None:
    sampler = Sampler(torch.device("cpu"), seed=0)
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


def test_seeded_rows_ignore_the_rest_of_the_batch() -> None:
    logits = torch.randn(3, 100)
    seeded = SamplingParams(seed=7)
    draws = []
    for engine_seed, neighbours in ((0, 1), (5, 2)):
        sampler = Sampler(torch.device("cpu"), seed=engine_seed)
        rows = torch.cat([logits[1 : 1 + neighbours], logits[:1]])
        params = [SamplingParams()] * neighbours + [seeded]
        ids = [f"n{i}" for i in range(neighbours)] + ["s"]
        draws.append([sampler.sample(rows, params, ids)[-1] for _ in range(10)])
    assert draws[0] == draws[1]


def test_sampling_follows_the_distribution() -> None:
    probs = torch.tensor([0.6, 0.3, 0.1, 0.0])
    sampler = Sampler(torch.device("cpu"), seed=0)
    logits = probs.log().expand(4000, -1).contiguous()
    out = torch.tensor(sampler.sample(logits, [SamplingParams()] * 4000, ["x"] * 4000))
    freq = torch.bincount(out, minlength=4).float() / 4000
    assert torch.allclose(freq, probs, atol=0.03)
    # Temperature 0.5 sharpens: p^2 normalised.
    sharp = sampler.sample(logits, [SamplingParams(temperature=0.5)] * 4000, ["x"] * 4000)
    freq = torch.bincount(torch.tensor(sharp), minlength=4).float() / 4000
    want = probs**2 / (probs**2).sum()
    assert torch.allclose(freq, want, atol=0.03)


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
        with pytest.raises(InvalidRequestError):
            SamplingParams(**bad)  # type: ignore[arg-type]
