"""Gated activation for the fused gate_up projection (one Triton kernel on CUDA)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gpu_engine.kernels import use_fused


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [tokens, 2 * intermediate] = [gate | up] -> [tokens, intermediate]
        if use_fused(x) and x.dim() == 2 and x.stride(-1) == 1:
            from gpu_engine.kernels.activation import silu_and_mul

            return silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
