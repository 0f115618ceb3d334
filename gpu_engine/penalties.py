"""Logit adjustments that depend on the request rather than the distribution: logit bias
and the repetition / presence / frequency penalties (torch, any device).

Each takes logits [N, vocab] (float32) and per-row values, and returns adjusted logits.
Rows whose value is neutral (bias absent, penalty 1.0 or 0.0) come out unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def logit_bias_tensors(
    biases: Sequence[Sequence[tuple[int, float]]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (row, token, bias) triples of every row's ``logit_bias`` as three flat tensors,
    built once per batch plan (``apply_logit_bias`` adds them each step)."""
    rows = [i for i, pairs in enumerate(biases) for _ in pairs]
    tokens = [t for pairs in biases for t, _ in pairs]
    values = [b for pairs in biases for _, b in pairs]
    return (
        staged(torch.tensor(rows, dtype=torch.int64), device),
        staged(torch.tensor(tokens, dtype=torch.int64), device),
        staged(torch.tensor(values, dtype=torch.float32), device),
    )


def staged(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on ``device``: through pinned memory on CUDA, so the copy does
    not wait for the forward pass still running there (a pageable copy synchronises)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def apply_logit_bias(
    logits: torch.Tensor, bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """Add each (row, token, value) of ``bias`` to ``logits`` (in place; returns them)."""
    rows, tokens, values = bias
    return logits.index_put_((rows, tokens), values, accumulate=True)


def token_counts(
    histories: Sequence[Sequence[int]], vocab: int, device: torch.device
) -> torch.Tensor:
    """[N, vocab] int32: how often each token occurs in each row's history."""
    width = max(1, max((len(h) for h in histories), default=0))
    # Pad with an extra column ``vocab`` that is dropped afterwards.
    padded = torch.full((len(histories), width), vocab, dtype=torch.int64)
    for i, h in enumerate(histories):
        if h:
            padded[i, : len(h)] = torch.as_tensor(h, dtype=torch.int64)
    padded = staged(padded, device)
    counts = torch.zeros(len(histories), vocab + 1, dtype=torch.int32, device=device)
    counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=torch.int32))
    return counts[:, :vocab]


def apply_penalties(
    logits: torch.Tensor,
    prompts: Sequence[Sequence[int]],
    outputs: Sequence[Sequence[int]],
    repetition: Sequence[float],
    presence: Sequence[float],
    frequency: Sequence[float],
) -> torch.Tensor:
    """The repetition penalty (a token seen in the prompt or the output so far: a positive
    logit divided by it, a negative one multiplied, as in CTRL and transformers), then
    presence and frequency penalties on the output so far (OpenAI's:
    ``logit - presence * (count > 0) - frequency * count``). Returns new logits."""
    vocab, device = logits.shape[-1], logits.device
    out_counts = token_counts(outputs, vocab, device)
    if any(r != 1.0 for r in repetition):
        seen = (out_counts > 0) | (token_counts(prompts, vocab, device) > 0)
        rep = staged(torch.tensor(repetition, dtype=logits.dtype), device)[:, None]
        penalised = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(seen, penalised, logits)
    if any(p != 0.0 for p in presence) or any(f != 0.0 for f in frequency):
        pres = staged(torch.tensor(presence, dtype=logits.dtype), device)[:, None]
        freq = staged(torch.tensor(frequency, dtype=logits.dtype), device)[:, None]
        logits = logits - freq * out_counts - pres * (out_counts > 0)
    return logits
