"""Logit bias and repetition / presence / frequency penalties against reference
implementations: transformers' RepetitionPenaltyLogitsProcessor, and OpenAI's documented
presence / frequency formula written out as a plain loop."""

from __future__ import annotations

import random

import torch
from transformers import RepetitionPenaltyLogitsProcessor

from gpu_engine.penalties import (
    apply_logit_bias,
    apply_penalties,
    logit_bias_tensors,
    token_counts,
)

VOCAB = 64


def _histories(seed: int, rows: int) -> tuple[list[list[int]], list[list[int]]]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(VOCAB) for _ in range(rng.randrange(1, 20))] for _ in range(rows)]
    outputs = [[rng.randrange(VOCAB) for _ in range(rng.randrange(0, 12))] for _ in range(rows)]
    return prompts, outputs


def test_repetition_penalty_matches_transformers() -> None:
    prompts, outputs = _histories(1, 4)
    logits = torch.randn(4, VOCAB) * 3
    penalties = [1.3, 1.0, 0.7, 2.0]
    got = apply_penalties(logits, prompts, outputs, penalties, [0.0] * 4, [0.0] * 4)
    for i, penalty in enumerate(penalties):
        ids = torch.tensor([prompts[i] + outputs[i]])
        want = RepetitionPenaltyLogitsProcessor(penalty)(ids, logits[i : i + 1].clone())
        torch.testing.assert_close(got[i : i + 1], want)


def test_presence_and_frequency_penalties_match_openais_formula() -> None:
    prompts, outputs = _histories(2, 5)
    logits = torch.randn(5, VOCAB)
    presence = [0.0, 0.5, -1.0, 2.0, 0.3]
    frequency = [0.0, 0.0, 0.7, -2.0, 1.1]
    got = apply_penalties(logits, prompts, outputs, [1.0] * 5, presence, frequency)
    want = logits.clone()
    for i in range(5):
        for token in set(outputs[i]):  # the prompt is not penalised, only the output
            count = outputs[i].count(token)
            want[i, token] -= presence[i] * (count > 0) + frequency[i] * count
    torch.testing.assert_close(got, want)
    # Rows without any penalty and tokens never generated come out unchanged.
    torch.testing.assert_close(got[0], logits[0])


def test_logit_bias_adds_to_the_named_tokens_only() -> None:
    logits = torch.randn(3, VOCAB)
    biases = [[(3, 5.0), (10, -100.0)], [], [(0, 1.5)]]
    got = apply_logit_bias(logits.clone(), logit_bias_tensors(biases, logits.device))
    want = logits.clone()
    for i, pairs in enumerate(biases):
        for token, bias in pairs:
            want[i, token] += bias
    torch.testing.assert_close(got, want)


def test_token_counts_of_empty_and_repeated_histories() -> None:
    counts = token_counts([[], [1, 1, 2], [VOCAB - 1]], VOCAB, torch.device("cpu"))
    assert counts.shape == (3, VOCAB)
    assert counts[0].sum() == 0
    assert counts[1, 1] == 2 and counts[1, 2] == 1 and counts[1].sum() == 3
    assert counts[2, VOCAB - 1] == 1
