"""RMSNorm, computed in float32 like the reference implementation, then cast back.

With ``residual`` it is the fused pre-norm step of a decoder layer: ``h = x + residual``
(rounded to the model dtype, as HF's eager add does), returns ``(norm(h), h)``. On CUDA both
forms run as one Triton kernel (the residual is updated in place).
"""

from __future__ import annotations

import torch
from torch import nn

from gpu_engine.kernels import use_fused


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., hidden]; normalise over the last dim in fp32 (bf16 variance is too coarse).
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if use_fused(x) and x.stride(-1) == 1 and (residual is None or x.dim() == 2):
            from gpu_engine.kernels.norm import rms_norm

            out, new_residual = rms_norm(x, self.weight, self.eps, residual=residual)
            return out if residual is None else (out, new_residual)  # type: ignore[return-value]
        if residual is None:
            return self._norm(x)
        h = x + residual
        return self._norm(h), h
