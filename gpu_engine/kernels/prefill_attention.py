"""Prefill / chunked-prefill attention over the paged KV cache (FlashAttention-2 algorithm).

Each sequence brings ``query_len`` new tokens at the end of a context of ``seq_len`` tokens
whose K/V (the cached prefix, earlier chunks and this step's tokens, already stored) live in
the paged cache. Query token j sits at position ``seq_len - query_len + j`` and attends keys
at positions ≤ its own. Grid: (query tiles, query heads), where a tile table lists the
(sequence, query tile) pairs of the step; entries with sequence -1 are padding and return at
once. The table is built on the host (``prefill_tiles``), so the launch needs no host value
from the device, and a launch with a fixed, large enough grid (a CUDA graph of a padded mixed
step) serves any mix of query lengths. A program keeps a
[BLOCK_M, head_dim] query tile in registers and streams K/V tiles of BLOCK_N tokens gathered
through the block table, with an online softmax: the [query_len, seq_len] score matrix is
never materialised. Keys strictly before the tile's first query position need no causal
mask (first loop); only the diagonal band is masked (second loop). Tiles are read and
attended as in the decode kernel (``kernels.kv_tiles``), FP8 caches included.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from gpu_engine.kernels import check_kv_cache
from gpu_engine.kernels.kv_tiles import attend_tile, load_kv_tile, tile_constants
from gpu_engine.kernels.prefill_tiles import prefill_block_m, prefill_tiles

_LOG2E = 1.4426950408889634


@triton.jit
def _attend_tile(
    q,
    m_i,
    l_i,
    acc,
    k_cache_ptr,
    v_cache_ptr,
    k_scale_ptr,
    v_scale_ptr,
    bt_row,
    start,
    q_pos,
    seq_len,
    kv_head,
    stride_c_blk,
    stride_c_tok,
    qk_scale,
    d,
    MASKED: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    FP8: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    n = start + tl.arange(0, BLOCK_N)
    n_mask = n < seq_len
    k, v, k_s, v_s = load_kv_tile(
        k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, bt_row, n, n_mask, d, kv_head,
        stride_c_blk, stride_c_tok, q.dtype, PAGE, HEAD_DIM, BLOCK_D, NUM_KV_HEADS, FP8, UPCAST,
    )  # fmt: skip
    keep = (n[None, :] <= q_pos[:, None]) & n_mask[None, :]  # causal, on the diagonal band
    return attend_tile(q, k, v, k_s, v_s, keep, m_i, l_i, acc, qk_scale, MASKED, FP8, PRECISION)


# See decode_attention: one variant whatever the block-table width of the step.
@triton.jit(do_not_specialize=["stride_bt_seq"])
def _prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    k_scale_ptr,
    v_scale_ptr,
    block_table_ptr,
    cu_seqlens_q_ptr,
    seq_lens_ptr,
    tiles_ptr,
    out_ptr,
    qk_scale,
    stride_q_tok,
    stride_q_head,
    stride_bt_seq,
    stride_c_blk,
    stride_c_tok,
    stride_o_tok,
    stride_o_head,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    FP8: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    FP16_DOT: tl.constexpr,
):
    tile = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.load(tiles_ptr + 2 * tile)
    m_tile = tl.load(tiles_ptr + 2 * tile + 1)
    # Padding entries (seq -1) have nothing to do.
    if seq >= 0:
        q_start = tl.load(cu_seqlens_q_ptr + seq)
        q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
        seq_len = tl.load(seq_lens_ptr + seq)
        ctx_len = seq_len - q_len  # tokens before this step's queries
        m = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = m < q_len
        q_pos = ctx_len + m
        d = tl.arange(0, BLOCK_D)
        d_mask = d < HEAD_DIM
        tok = (q_start + m).to(tl.int64)
        q = tl.load(
            q_ptr + tok[:, None] * stride_q_tok + head * stride_q_head + d[None, :],
            mask=m_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        if UPCAST:
            q = q.to(tl.float32)
        if FP16_DOT:  # FP8 tiles convert to q's dtype: fp16 (kernels.fp16_dot)
            q = q.to(tl.float16)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        bt_row = block_table_ptr + seq.to(tl.int64) * stride_bt_seq
        kv_head = head // GROUP

        first_q = ctx_len + m_tile * BLOCK_M
        full_end = (first_q // BLOCK_N) * BLOCK_N  # keys < full_end: visible to every row
        end = tl.minimum(seq_len, first_q + BLOCK_M)
        for start in range(0, full_end, BLOCK_N):
            m_i, l_i, acc = _attend_tile(
                q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, bt_row,
                start, q_pos, seq_len, kv_head, stride_c_blk, stride_c_tok, qk_scale, d, False,
                PAGE, BLOCK_N, UPCAST, PRECISION, FP8, NUM_KV_HEADS, HEAD_DIM, BLOCK_D,
            )  # fmt: skip
        for start in range(full_end, end, BLOCK_N):
            m_i, l_i, acc = _attend_tile(
                q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, bt_row,
                start, q_pos, seq_len, kv_head, stride_c_blk, stride_c_tok, qk_scale, d, True,
                PAGE, BLOCK_N, UPCAST, PRECISION, FP8, NUM_KV_HEADS, HEAD_DIM, BLOCK_D,
            )  # fmt: skip

        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        o_ptrs = out_ptr + tok[:, None] * stride_o_tok + head * stride_o_head + d[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    max_query_len: int,
    scale: float,
    out: torch.Tensor | None = None,
    tiles: torch.Tensor | None = None,
    block_m: int | None = None,
    kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """q: [num_tokens, num_heads, head_dim] (sequences back to back, ``cu_seqlens_q``
    [num_seqs + 1] int32 prefix sums); caches [num_blocks, page, num_kv_heads, head_dim]
    holding every key of each sequence (this step's included); block_tables [num_seqs,
    max_blocks] int32; seq_lens [num_seqs] int32. Returns [num_tokens, num_heads, head_dim].

    ``tiles``: the step's tile table (``prefill_tiles`` with ``block_m`` rows per tile) on
    q's device; the grid is its length. Without it, the table is built here from
    ``cu_seqlens_q`` (a device-to-host read). An FP8 cache comes with ``kv_scales`` (K and V
    scales [num_blocks, page, num_kv_heads] fp32)."""
    num_tokens, num_heads, head_dim = q.shape
    _, _, num_kv_heads, cache_dim = k_cache.shape
    if cache_dim != head_dim or num_heads % num_kv_heads:
        raise ValueError(f"q {tuple(q.shape)} vs cache {tuple(k_cache.shape)}")
    if q.stride(2) != 1:
        raise ValueError("q rows must be contiguous in head_dim")
    k_scales, v_scales = check_kv_cache(k_cache, v_cache, kv_scales)
    if out is None:
        out = torch.empty_like(q)
    num_seqs = seq_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return out
    if block_m is None:
        block_m = prefill_block_m(q.dtype, max_query_len)
    if tiles is None:
        cu = cu_seqlens_q.cpu().numpy().astype(np.int64)
        tiles = torch.from_numpy(prefill_tiles(np.diff(cu), block_m)).to(q.device)
    block_n = (64 if head_dim <= 128 else 32) if q.element_size() <= 2 else 32
    grid = (tiles.shape[0], num_heads)
    _prefill_kernel[grid](
        q,
        k_cache,
        v_cache,
        k_scales,
        v_scales,
        block_tables,
        cu_seqlens_q,
        seq_lens,
        tiles,
        out,
        scale * _LOG2E,
        q.stride(0),
        q.stride(1),
        block_tables.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        out.stride(0),
        out.stride(1),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        **tile_constants(q, k_cache, kv_scales),
        num_warps=4,
        num_stages=2,
    )
    return out
