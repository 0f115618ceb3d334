"""Tensor-parallel layers (Megatron-LM's split), built for the group current at construction.

Column-parallel projections (qkv split by heads, gate_up on the intermediate dim) need no
layer of their own: the model is built from the rank's share of the architecture
(``gpu_engine.tp_shards.local_arch``), so they are plain ``nn.Linear`` of the local width.
Their outputs feed a row-parallel layer (o_proj, down_proj), which sums the ranks' partial
products with one all-reduce. Embedding and LM head are vocab-parallel: each rank holds
``ceil(vocab / N)`` rows (the last rank zero-padded), the embedding all-reduces the rows each
rank owns, the head gathers logit shards onto rank 0, which samples.

With a single rank every layer here is exactly its torch base class.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gpu_engine.tp_group import current


class RowParallelLinear(nn.Linear):
    """``x @ W.T + b`` with W split on its input dim: this rank holds ``W[:, shard]`` and gets
    the matching slice of x ([T, in_local]); partial products are summed over the ranks and
    the (replicated) bias is added once, after the sum."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.tp = current()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return super().forward(x)
        out = self.tp.all_reduce(F.linear(x, self.weight))  # [T, out]
        return out if self.bias is None else out + self.bias


def vocab_shard(vocab_size: int, rank: int, size: int) -> tuple[int, int]:
    """(first row, rows per rank) of ``rank``'s vocab shard; rows past the vocab are padding."""
    per_rank = -(-vocab_size // size)
    return rank * per_rank, per_rank


class VocabParallelEmbedding(nn.Embedding):
    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        tp = current()
        self.vocab_start, per_rank = vocab_shard(vocab_size, tp.rank, tp.size)
        super().__init__(per_rank, hidden_size)
        self.tp = tp

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # input_ids: [T] -> [T, hidden]; rows of ids another rank owns are zero before the sum.
        if self.tp.size == 1:
            return super().forward(input_ids)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.num_embeddings)
        h = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.tp.all_reduce(h.masked_fill(outside[:, None], 0.0))


class ParallelLMHead(nn.Linear):
    def __init__(self, hidden_size: int, vocab_size: int) -> None:
        tp = current()
        _, per_rank = vocab_shard(vocab_size, tp.rank, tp.size)
        super().__init__(hidden_size, per_rank, bias=False)
        self.tp, self.vocab_size = tp, vocab_size
        # An FP8 copy of this rank's rows (``use_quantized``); None: the model dtype's weight.
        self.quantized: nn.Module | None = None

    def use_quantized(self, quantized: nn.Module, keep_weight: bool) -> None:
        """Compute this rank's logits with ``quantized`` (a module of the same rows, e.g. an
        ``Fp8Linear``); the model-dtype weight is freed unless another module reads it (an
        embedding tied to the head)."""
        self.quantized = quantized
        if not keep_weight:
            self.weight = nn.Parameter(self.weight.new_empty(0, 0), requires_grad=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> logits [N, vocab] on rank 0 (other ranks: their own shard,
        [N, vocab / N]). Every rank must call it with the same N."""
        if self.tp.size > 1 and hidden.shape[0] == 0:
            return hidden.new_empty(0, self.vocab_size)  # nothing samples: no collective
        local = F.linear(hidden, self.weight) if self.quantized is None else self.quantized(hidden)
        if self.tp.size == 1:
            return local
        logits = self.tp.gather_last_dim(local)
        return logits[:, : self.vocab_size] if self.tp.rank == 0 else logits
