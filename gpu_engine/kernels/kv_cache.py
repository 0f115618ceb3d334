"""Store this step's K/V rows into the paged cache by slot mapping.

With an FP8 cache (e4m3, ``gpu_engine.fp8``) each token's K and V are quantized per KV head
on the way in: one fp32 scale per (slot, KV head) in a scale tensor beside the cache; V is
written page-major.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gpu_engine.fp8 import FP8_DTYPE
from gpu_engine.kernels import check_kv_cache
from gpu_engine.kernels.fp8_math import quantize_e4m3


@triton.jit
def _store_kv_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    stride_k_tok,
    stride_v_tok,
    stride_cache_slot,
    ROW: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # One program per new token: copies its [num_kv_heads * head_dim] row of K and of V.
    tok = tl.program_id(0)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    # slot -1 marks padding (CUDA-graph batch padding): nothing is stored. (One comparison
    # rather than `& (slot >= 0)`: the interpreter turns scalar-bool & vector-bool into int.)
    mask = offs < tl.where(slot >= 0, ROW, 0)
    k = tl.load(k_ptr + tok.to(tl.int64) * stride_k_tok + offs, mask=mask)
    v = tl.load(v_ptr + tok.to(tl.int64) * stride_v_tok + offs, mask=mask)
    tl.store(k_cache_ptr + slot * stride_cache_slot + offs, k, mask=mask)
    tl.store(v_cache_ptr + slot * stride_cache_slot + offs, v, mask=mask)


@triton.jit
def _quantize_row(src, cache, scales, src_offs, cache_offs, mask, h, h_mask, scale_row):
    x = tl.load(src + src_offs, mask=mask, other=0.0).to(tl.float32)  # [HEADS_PAD, BLOCK_D]
    q, scale = quantize_e4m3(x, tl.max(tl.abs(x), 1))
    tl.store(cache + cache_offs, q, mask=mask)
    tl.store(scales + scale_row + h, scale, mask=h_mask)


@triton.jit
def _store_kv_fp8_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    k_scale_ptr,
    v_scale_ptr,
    slot_ptr,
    stride_k_tok,
    stride_v_tok,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr,
):
    # One program per new token: quantizes its K and V rows [num_kv_heads, head_dim] with one
    # scale per KV head; scales live at [slot, kv_head] of the (contiguous) scale tensors. K
    # is stored token-major, V page-major (gpu_engine.fp8): channel c of head h of the token
    # in slot s = page * PAGE + t sits at page * PAGE * NUM_KV_HEADS * HEAD_DIM +
    # (h * HEAD_DIM + c) * PAGE + t.
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    h = tl.arange(0, HEADS_PAD)
    d = tl.arange(0, BLOCK_D)
    # slot -1 (padding) masks everything, as in _store_kv_kernel.
    h_mask = h < tl.where(slot >= 0, NUM_KV_HEADS, 0)
    mask = h_mask[:, None] & (d[None, :] < HEAD_DIM)
    offs = h[:, None] * HEAD_DIM + d[None, :]
    k_offs = slot * (NUM_KV_HEADS * HEAD_DIM) + offs
    v_offs = (slot - slot % PAGE) * (NUM_KV_HEADS * HEAD_DIM) + offs * PAGE + slot % PAGE
    scale_row = slot * NUM_KV_HEADS
    _quantize_row(k_ptr + tok * stride_k_tok, k_cache_ptr, k_scale_ptr, offs, k_offs, mask, h,
                  h_mask, scale_row)  # fmt: skip
    _quantize_row(v_ptr + tok * stride_v_tok, v_cache_ptr, v_scale_ptr, offs, v_offs, mask, h,
                  h_mask, scale_row)  # fmt: skip


def store_kv_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """k, v: [num_tokens, num_kv_heads, head_dim] (token stride free, heads packed);
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim], contiguous (an FP8
    V cache page-major, ``gpu_engine.fp8``); slot_mapping: [num_tokens] int (-1 = skip). An
    FP8 cache needs ``kv_scales``: K and V scales [num_blocks, block_size, num_kv_heads]
    fp32, contiguous."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    row = num_kv_heads * head_dim
    for t in (k, v):
        if t.stride(2) != 1 or t.stride(1) != head_dim:
            raise ValueError("k/v rows must be [num_kv_heads, head_dim] packed")
    scales = check_kv_cache(k_cache, v_cache, kv_scales)
    fp8 = k_cache.dtype == FP8_DTYPE
    if k_cache.shape[2:] != (num_kv_heads, head_dim) or not (fp8 or k_cache.dtype == k.dtype):
        raise ValueError(f"cache {tuple(k_cache.shape)} {k_cache.dtype} vs k {tuple(k.shape)}")
    if fp8:
        _store_fp8(k, v, k_cache, v_cache, slot_mapping, scales)
        return
    _store_kv_kernel[(num_tokens,)](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        k.stride(0),
        v.stride(0),
        row,
        ROW=row,
        BLOCK=triton.next_power_of_2(row),
        num_warps=4,
    )


def _store_fp8(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_scales: tuple[torch.Tensor, torch.Tensor],
) -> None:
    num_tokens, num_kv_heads, head_dim = k.shape
    _store_kv_fp8_kernel[(num_tokens,)](
        k,
        v,
        k_cache,
        v_cache,
        kv_scales[0],
        kv_scales[1],
        slot_mapping,
        k.stride(0),
        v.stride(0),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
        PAGE=k_cache.shape[1],
        num_warps=4,
    )
