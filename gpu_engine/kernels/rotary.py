"""Rotary position embedding (GPT-NeoX / HF "rotate half" layout), in place on q and k.

cos/sin tables are [max_positions, rotary_dim / 2] fp32, built by the model the same way HF
builds them (rope scaling included), so this kernel only gathers rows by position and
rotates: x1' = x1·cos − x2·sin, x2' = x2·cos + x1·sin over the two halves of rotary_dim.
One program per token covers all q and k heads of that token.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(
    x_ptr, tok, stride_tok, stride_head, n_heads, cos, sin, HEADS_PAD: tl.constexpr,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr,
):  # fmt: skip
    h = tl.arange(0, HEADS_PAD)
    j = tl.arange(0, HALF_PAD)
    mask = (h[:, None] < n_heads) & (j[None, :] < HALF)
    base = x_ptr + tok * stride_tok + h[:, None] * stride_head + j[None, :]
    x1 = tl.load(base, mask=mask, other=0.0)
    x2 = tl.load(base + HALF, mask=mask, other=0.0)
    a = x1.to(tl.float32)
    b = x2.to(tl.float32)
    tl.store(base, (a * cos[None, :] - b * sin[None, :]).to(x1.dtype), mask=mask)
    tl.store(base + HALF, (b * cos[None, :] + a * sin[None, :]).to(x1.dtype), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr,
    k_ptr,
    pos_ptr,
    cos_ptr,
    sin_ptr,
    stride_q_tok,
    stride_q_head,
    stride_k_tok,
    stride_k_head,
    stride_cs,
    n_q_heads,
    n_k_heads,
    Q_HEADS_PAD: tl.constexpr,
    K_HEADS_PAD: tl.constexpr,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    j = tl.arange(0, HALF_PAD)
    cos = tl.load(cos_ptr + pos * stride_cs + j, mask=j < HALF, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + pos * stride_cs + j, mask=j < HALF, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr, tok, stride_q_tok, stride_q_head, n_q_heads, cos, sin,
                  Q_HEADS_PAD, HALF, HALF_PAD)  # fmt: skip
    _rotate_heads(k_ptr, tok, stride_k_tok, stride_k_head, n_k_heads, cos, sin,
                  K_HEADS_PAD, HALF, HALF_PAD)  # fmt: skip


def apply_rotary(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> None:
    """positions: [tokens] int; q: [tokens, q_heads, head_dim], k: [tokens, k_heads, head_dim]
    (last dim contiguous, rotated in place over the first rotary_dim = 2 * cos.shape[1]
    channels); cos, sin: [max_positions, rotary_dim / 2] (same strides)."""
    tokens = q.shape[0]
    half = cos.shape[1]
    if q.stride(2) != 1 or k.stride(2) != 1 or cos.stride() != sin.stride() or cos.stride(1) != 1:
        raise ValueError("q, k, cos, sin must be contiguous in their last dim")
    if 2 * half > q.shape[2]:
        raise ValueError(f"rotary_dim {2 * half} > head_dim {q.shape[2]}")
    if tokens == 0:
        return
    _rotary_kernel[(tokens,)](
        q,
        k,
        positions,
        cos,
        sin,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        cos.stride(0),
        q.shape[1],
        k.shape[1],
        Q_HEADS_PAD=triton.next_power_of_2(q.shape[1]),
        K_HEADS_PAD=triton.next_power_of_2(k.shape[1]),
        HALF=half,
        HALF_PAD=triton.next_power_of_2(half),
        num_warps=4,
    )
