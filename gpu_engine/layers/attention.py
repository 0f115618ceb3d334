"""The attention layer: hands q/k/v to the configured backend with this step's metadata."""

from __future__ import annotations

import torch
from torch import nn

from gpu_engine.context import get_forward_context
from gpu_engine.layers.base import AttentionBackend


class Attention(nn.Module):
    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        backend: AttentionBackend,
    ) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.backend = backend
        # Views into the runner's KV cache, [num_blocks, block_size, KVH, D]; set by the runner.
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)
        # An FP8 cache's K and V scales, [num_blocks, block_size, KVH] fp32; set by the runner.
        self.kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q: [T, H, D], k/v: [T, KVH, D] -> [T, H, D]
        meta = get_forward_context().attn_metadata
        return self.backend.forward(
            q, k, v, self.k_cache, self.v_cache, meta, self.scale, self.kv_scales
        )
