"""A tile of the paged KV cache as the attention kernels read it, and one online-softmax step
over it: the part decode, prefill and the shared-prefix kernel have in common.

Keys are gathered BLOCK_N at a time through a block table row (pages of PAGE tokens in any
order). K is token-major; an FP8 cache keeps V page-major (``gpu_engine.fp8``), values e4m3
with an fp32 scale per token and KV head: K's scales multiply the score columns, V's the
probabilities before the P·V product, so no dequantized tile is materialised.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from gpu_engine.kernels import INTERPRET, dot_precision, fp16_dot
from gpu_engine.kernels.fp8_math import scaled_probs


def tile_constants(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    kv_scales: tuple[torch.Tensor, torch.Tensor] | None,
) -> dict[str, Any]:
    """The constexprs ``load_kv_tile`` and ``attend_tile`` need, as every attention launch
    passes them: q [tokens, heads, head_dim] against a cache [blocks, page, KV heads,
    head_dim] (FP8 when ``kv_scales`` are given)."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    _, page, num_kv_heads, _ = k_cache.shape
    return dict(
        GROUP=num_heads // num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim),
        PAGE=page,
        UPCAST=INTERPRET,
        PRECISION=dot_precision(q.dtype),
        FP8=kv_scales is not None,
        NUM_KV_HEADS=num_kv_heads,
        FP16_DOT=fp16_dot(q, kv_scales),
    )


@triton.jit
def load_kv_tile(
    k_cache_ptr,
    v_cache_ptr,
    k_scale_ptr,
    v_scale_ptr,
    bt_row,
    n,
    n_mask,
    d,
    kv_head,
    stride_c_blk,
    stride_c_tok,
    dtype: tl.constexpr,
    PAGE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    FP8: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """K and V of keys ``n`` [BLOCK_N] (valid where ``n_mask``) of one KV head, channels ``d``
    [BLOCK_D]: (k, v [BLOCK_N, BLOCK_D] ready for the dots, k_s, v_s [BLOCK_N] fp32: an FP8
    cache's scales, 0 for masked keys; ones otherwise)."""
    blk = tl.load(bt_row + n // PAGE, mask=n_mask, other=0).to(tl.int64)
    d_mask = d < HEAD_DIM
    rows = blk * stride_c_blk + (n % PAGE) * stride_c_tok + kv_head * HEAD_DIM
    kv_mask = n_mask[:, None] & d_mask[None, :]
    k = tl.load(k_cache_ptr + rows[:, None] + d[None, :], mask=kv_mask, other=0.0)
    if FP8:
        # Page-major V: the PAGE keys of a page are contiguous for each channel. Pages are
        # page-aligned, which Triton cannot see through the block-table gather: the hints
        # let it copy runs of PAGE bytes asynchronously.
        v_rows = blk * stride_c_blk + kv_head * (HEAD_DIM * PAGE) + n % PAGE
        v_offs = v_rows[:, None] + d[None, :] * PAGE
        v_offs = tl.max_contiguous(tl.multiple_of(v_offs, [PAGE, 1]), [PAGE, 1])
        # No key mask, which would cut the runs into bytes: a masked key reads its page's
        # slot (block 0 past the table), bytes the FP8 store wrote or zeros, and adds
        # p * v_s = 0 times that finite value.
        if HEAD_DIM == BLOCK_D:
            v = tl.load(v_cache_ptr + v_offs)
        else:
            v = tl.load(v_cache_ptr + v_offs, mask=d_mask[None, :], other=0.0)
        srow = (blk * PAGE + n % PAGE) * NUM_KV_HEADS + kv_head
        k_s = tl.load(k_scale_ptr + srow, mask=n_mask, other=0.0)
        v_s = tl.load(v_scale_ptr + srow, mask=n_mask, other=0.0)
        k = k.to(dtype)
        v = v.to(dtype)
    else:
        v = tl.load(v_cache_ptr + rows[:, None] + d[None, :], mask=kv_mask, other=0.0)
        k_s = tl.full(n.shape, 1.0, tl.float32)
        v_s = k_s
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
    return k, v, k_s, v_s


@triton.jit
def attend_tile(
    q,
    k,
    v,
    k_s,
    v_s,
    keep,
    m_i,
    l_i,
    acc,
    qk_scale,
    MASK: tl.constexpr,
    FP8: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One online-softmax step (base 2) of queries ``q`` [M, BLOCK_D] over a tile from
    ``load_kv_tile``; scores where not ``keep`` [M or 1, BLOCK_N] are dropped (if MASK).
    Returns the running max, sum and unnormalised output."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [M, BLOCK_N]
    if FP8:
        s = s * k_s[None, :]
    if MASK:
        s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if FP8:
        pv, v_top = scaled_probs(p, v_s, v.dtype)
        acc = acc * alpha[:, None] + tl.dot(pv, v, input_precision=PRECISION) * v_top
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc
