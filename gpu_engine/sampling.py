"""Token sampling in torch: greedy, temperature, top-k, top-p, per-request generators.

Random rows are drawn with the exponential race (argmax of p / E, E ~ Exp(1)), which equals a
categorical draw from p. A request with a seed draws its E from its own ``torch.Generator``,
so its tokens do not depend on which other requests share the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gpu_engine.sequence import SamplingParams


@dataclass
class _BatchPlan:
    """Per-row sampling parameters of one batch as device tensors; reused while the batch's
    parameters and request ids stay the same (decode steps of an unchanged batch), so a step
    does not rebuild and copy them."""

    all_greedy: bool
    greedy: torch.Tensor | None = None  # [N] bool
    temperature: torch.Tensor | None = None  # [N] float32 (1.0 on greedy rows)
    top_k: torch.Tensor | None = None  # [N] int64, or None when no row filters by top-k
    top_p: torch.Tensor | None = None  # [N] float32, or None when no row filters by top-p
    seeded: tuple[tuple[int, str, int], ...] = ()  # (row, request id, seed)


class Sampler:
    def __init__(self, device: torch.device, seed: int) -> None:
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self._request_generators: dict[str, torch.Generator] = {}
        self._plan_key: tuple[tuple[SamplingParams, ...], tuple[str, ...]] | None = None
        self._plan: _BatchPlan | None = None

    def generator_for(self, request_id: str, seed: int) -> torch.Generator:
        gen = self._request_generators.get(request_id)
        if gen is None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seed)
            self._request_generators[request_id] = gen
        return gen

    def release(self, request_id: str) -> None:
        self._request_generators.pop(request_id, None)

    def sample(
        self, logits: torch.Tensor, params: Sequence[SamplingParams], request_ids: Sequence[str]
    ) -> list[int]:
        """logits: [N, vocab] -> one token id per row."""
        return self.sample_async(logits, params, request_ids).tolist()  # type: ignore[no-any-return]

    def sample_async(
        self, logits: torch.Tensor, params: Sequence[SamplingParams], request_ids: Sequence[str]
    ) -> torch.Tensor:
        """Like ``sample`` but returns the [N] token ids on the logits' device without waiting
        for them (the caller's ``tolist()`` is the step's one synchronisation)."""
        logits = logits.float()
        plan = self._plan_for(params, request_ids, logits.device)
        if plan.all_greedy:
            return logits.argmax(dim=-1)
        assert plan.greedy is not None and plan.temperature is not None
        probs = _mask_top_k_top_p(
            logits / plan.temperature[:, None], plan.top_k, plan.top_p
        ).softmax(dim=-1)
        noise = torch.empty_like(probs)
        noise.exponential_(generator=self.generator)
        for i, request_id, seed in plan.seeded:
            noise[i].exponential_(generator=self.generator_for(request_id, seed))
        sampled = (probs / noise).argmax(dim=-1)
        return torch.where(plan.greedy, logits.argmax(dim=-1), sampled)

    def _plan_for(
        self, params: Sequence[SamplingParams], request_ids: Sequence[str], device: torch.device
    ) -> _BatchPlan:
        # Tuple equality checks identity first, so an unchanged batch compares in C.
        key = (tuple(params), tuple(request_ids))
        if self._plan is not None and key == self._plan_key:
            return self._plan
        if all(p.greedy for p in params):
            plan = _BatchPlan(all_greedy=True)
        else:
            top_k, top_p = [p.top_k for p in params], [p.top_p for p in params]
            vocab_inf = 1 << 62  # "no top-k": larger than any vocabulary
            plan = _BatchPlan(
                all_greedy=False,
                greedy=_to_device([p.greedy for p in params], torch.bool, device),
                temperature=_to_device(
                    [p.temperature if not p.greedy else 1.0 for p in params],
                    torch.float32,
                    device,
                ),
                top_k=_to_device([k if k > 0 else vocab_inf for k in top_k], torch.int64, device)
                if any(k > 0 for k in top_k)
                else None,
                top_p=_to_device(top_p, torch.float32, device)
                if any(p < 1.0 for p in top_p)
                else None,
                seeded=tuple(
                    (i, request_ids[i], p.seed)
                    for i, p in enumerate(params)
                    if p.seed is not None and not p.greedy
                ),
            )
        self._plan_key, self._plan = key, plan
        return plan


def resolve_pending(input_ids: torch.Tensor, last_tokens: torch.Tensor) -> torch.Tensor:
    """``input_ids`` with each placeholder ``pending_token(j)`` (a negative id: the token
    sampled in row ``j`` of the previous step, not on the host yet) replaced by
    ``last_tokens[j]``, the device copy of that step's samples. No host sync: the steps
    run in stream order, so the previous step has written ``last_tokens`` by then."""
    rows = (-1 - input_ids).clamp_(min=0)  # placeholder -1 - j -> j; real ids -> 0
    return torch.where(input_ids < 0, last_tokens[rows], input_ids)


def _to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Small per-row parameter vectors: staged in pinned memory and copied asynchronously,
    so building them does not wait for the forward pass still running on the GPU (a copy
    from pageable memory synchronises the stream); the one sync per step stays the
    ``tolist()`` of the sampled tokens."""
    t = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: Sequence[int], top_p: Sequence[float]
) -> torch.Tensor:
    """Mask logits [N, vocab] outside each row's top-k / nucleus top-p to -inf
    (top_k 0 and top_p 1 keep everything; the most likely token always survives)."""
    vocab = logits.shape[-1]
    k = (
        _to_device([kk if kk > 0 else vocab for kk in top_k], torch.int64, logits.device)
        if any(kk > 0 for kk in top_k)
        else None
    )
    p = (
        _to_device(list(top_p), torch.float32, logits.device)
        if any(pp < 1.0 for pp in top_p)
        else None
    )
    return _mask_top_k_top_p(logits, k, p)


def _mask_top_k_top_p(
    logits: torch.Tensor, k: torch.Tensor | None, p: torch.Tensor | None
) -> torch.Tensor:
    """``apply_top_k_top_p`` with the per-row vectors already on the device: k [N] int64
    (rows without top-k hold a value >= vocab), p [N] float32; None = no row uses it."""
    if k is None and p is None:
        return logits
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    drop = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if k is not None:
        drop |= ranks >= k[:, None]
    if p is not None:
        probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of strictly better tokens
        drop |= mass_before >= p[:, None]
    drop[:, 0] = False
    masked = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, masked)
