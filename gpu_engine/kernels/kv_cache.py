"""Store this step's K/V rows into the paged cache by slot mapping."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


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


def store_kv_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """k, v: [num_tokens, num_kv_heads, head_dim] (token stride free, heads packed);
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim] contiguous;
    slot_mapping: [num_tokens] int (-1 = skip)."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    row = num_kv_heads * head_dim
    for t in (k, v):
        if t.stride(2) != 1 or t.stride(1) != head_dim:
            raise ValueError("k/v rows must be [num_kv_heads, head_dim] packed")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("KV cache must be contiguous")
    if k_cache.shape[2:] != (num_kv_heads, head_dim) or k_cache.dtype != k.dtype:
        raise ValueError(f"cache {tuple(k_cache.shape)} {k_cache.dtype} vs k {tuple(k.shape)}")
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
