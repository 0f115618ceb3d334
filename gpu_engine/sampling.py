"""Token sampling in torch: greedy, temperature, top-k, top-p, per-request generators.

Random rows are drawn with the exponential race (argmax of p / E, E ~ Exp(1)), which equals a
categorical draw from p. A request with a seed draws its E from its own ``torch.Generator``,
so its tokens do not depend on which other requests share the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gpu_engine.sequence import SamplingParams


class Sampler:
    def __init__(self, device: torch.device, seed: int) -> None:
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self._request_generators: dict[str, torch.Generator] = {}

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
        logits = logits.float()
        if all(p.greedy for p in params):
            return logits.argmax(dim=-1).tolist()
        greedy = _to_device([p.greedy for p in params], torch.bool, logits.device)
        temperature = _to_device(
            [p.temperature if not p.greedy else 1.0 for p in params], torch.float32, logits.device
        )
        probs = apply_top_k_top_p(
            logits / temperature[:, None],
            [p.top_k for p in params],
            [p.top_p for p in params],
        ).softmax(dim=-1)
        noise = torch.empty_like(probs)
        noise.exponential_(generator=self.generator)
        for i, p in enumerate(params):
            if p.seed is not None and not p.greedy:
                gen = self.generator_for(request_ids[i], p.seed)
                noise[i].exponential_(generator=gen)
        sampled = (probs / noise).argmax(dim=-1)
        return torch.where(greedy, logits.argmax(dim=-1), sampled).tolist()


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
    use_k = any(k > 0 for k in top_k)
    use_p = any(p < 1.0 for p in top_p)
    if not (use_k or use_p):
        return logits
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    drop = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if use_k:
        k = _to_device([kk if kk > 0 else vocab for kk in top_k], torch.int64, logits.device)
        drop |= ranks >= k[:, None]
    if use_p:
        p = _to_device(list(top_p), torch.float32, logits.device)
        probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of strictly better tokens
        drop |= mass_before >= p[:, None]
    drop[:, 0] = False
    masked = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, masked)
