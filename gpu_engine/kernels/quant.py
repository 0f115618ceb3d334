"""Per-token FP8 (e4m3) quantization of activations: the input side of an FP8 matmul.

One program per row: a first pass over the row finds its absolute maximum, a second writes
``row / scale`` as e4m3 (rounded as ``gpu_engine.fp8.quantize_rows`` rounds, bit for bit)
and the row's scale. Rows are read in chunks of BLOCK elements, so any width works.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gpu_engine.fp8 import FP8_DTYPE
from gpu_engine.kernels.fp8_math import e4m3_scale, to_e4m3


@triton.jit
def _quantize_rows_kernel(
    x_ptr,
    out_ptr,
    scale_ptr,
    stride_x_row,
    n_cols,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x_row
    offs = tl.arange(0, BLOCK)
    amax = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n_cols, BLOCK):
        x = tl.load(x_row + start + offs, mask=start + offs < n_cols, other=0.0)
        amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
    scale, inv = e4m3_scale(tl.max(amax, 0))
    for start in range(0, n_cols, BLOCK):
        mask = start + offs < n_cols
        x = tl.load(x_row + start + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * n_cols + start + offs, to_e4m3(x, inv), mask=mask)
    tl.store(scale_ptr + row, scale)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (rows may be strided, elements contiguous) -> (e4m3 [M, K] contiguous, fp32
    scales [M])."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"x must be [M, K] with contiguous rows, got {tuple(x.shape)}")
    m, k = x.shape
    out = torch.empty((m, k), dtype=FP8_DTYPE, device=x.device)
    scales = torch.empty(m, dtype=torch.float32, device=x.device)
    if m == 0:
        return out, scales
    block = min(2048, triton.next_power_of_2(k))
    _quantize_rows_kernel[(m,)](x, out, scales, x.stride(0), k, BLOCK=block, num_warps=4)
    return out, scales
