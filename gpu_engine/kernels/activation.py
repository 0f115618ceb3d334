"""SiLU-and-mul: ``silu(x[:, :I]) * x[:, I:]`` in one pass (HF rounding order)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, inter, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + inter + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    # HF: act(gate) is rounded to the model dtype before the product.
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (act * up.to(tl.float32)).to(gate.dtype), mask=mask)


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x: [tokens, 2 * inter] (gate then up, last dim contiguous) -> [tokens, inter]."""
    tokens, two_inter = x.shape
    if two_inter % 2 or x.stride(1) != 1:
        raise ValueError(f"x {tuple(x.shape)} must be [tokens, 2*inter], contiguous rows")
    inter = two_inter // 2
    if out is None:
        out = torch.empty((tokens, inter), dtype=x.dtype, device=x.device)
    if tokens == 0:
        return out
    block = min(1024, triton.next_power_of_2(inter))
    _silu_and_mul_kernel[(tokens, triton.cdiv(inter, block))](
        x, out, x.stride(0), out.stride(0), inter, BLOCK=block, num_warps=4
    )
    return out
