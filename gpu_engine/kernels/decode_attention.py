"""Paged decode attention (one query token per sequence) with split-K over the context.

Grid: (num_seqs, num_kv_heads, num_splits). A program loads the query rows of all heads that
share one KV head (GQA group, padded to 16 rows so ``tl.dot`` runs on the tensor cores), so
each K/V byte is read once per step. Keys are walked in tiles of BLOCK_N tokens gathered
through the block table (BLOCK_N need not equal the page size). With split-K, each split
handles a contiguous run of tiles and writes a partial output and its log-sum-exp (base 2);
a second kernel merges the splits. The split count is a launch constant, and the tile range
of each split is computed in the kernel from ``seq_lens``: a CUDA graph captured once stays
valid for any context length.

Shared prefixes (``shared`` given, see ``kernels.shared_prefix``): each sequence attends
from ``kv_start`` on, its group's prefix partials sit in ``prefix_splits`` more partial
slots, and the merge kernel folds them in (only where ``kv_start`` > 0); with one split the
decode program folds them in itself and no merge kernel runs.

FP8 cache (``kv_scales`` given): K/V tiles are loaded as e4m3 (half the bytes) and converted
in registers (``kernels.kv_tiles``).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from gpu_engine.kernels import FP8_KV_TILE, check_kv_cache
from gpu_engine.kernels.kv_tiles import attend_tile, load_kv_tile, tile_constants
from gpu_engine.kernels.shared_prefix import choose_prefix_splits, launch_prefix_attention
from gpu_engine.layers.base import SharedPrefix

_LOG2E = 1.4426950408889634
# With one split, a shared-prefix step's decode program merges the prefix partials itself
# instead of a merge kernel after it; False: the merge kernel (the A/B in
# bench/fp8_kernels.py --parts prefix).
FOLD_PREFIX = True


@triton.jit
def _fold_partials(
    part_out_ptr,
    part_lse_ptr,
    seq,
    heads,
    d,
    rows,
    d_mask,
    m_i,
    l_i,
    acc,
    num_heads,
    HEAD_DIM: tl.constexpr,
    NUM_SLOTS: tl.constexpr,
):
    """The running (max, sum, unnormalised output) of a program's own keys with the
    normalised partials and log-sum-exps of slots [1, NUM_SLOTS) folded in for the query
    ``rows`` that have them (a valid head of a grouped sequence): the merge kernel's sum, in
    the decode program."""
    for slot in tl.static_range(1, NUM_SLOTS):
        base = (seq.to(tl.int64) * NUM_SLOTS + slot) * num_heads + heads
        lse = tl.load(part_lse_ptr + base, mask=rows, other=float("-inf"))
        part = tl.load(
            part_out_ptr + base[:, None] * HEAD_DIM + d[None, :],
            mask=rows[:, None] & d_mask[None, :],
            other=0.0,
        )
        m_new = tl.maximum(m_i, lse)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing seen yet: weights 0
        alpha = tl.exp2(m_i - m_safe)
        w = tl.exp2(lse - m_safe)  # a partial normalised by its own sum: weight 2^lse
        l_i = l_i * alpha + w
        acc = acc * alpha[:, None] + part * w[:, None]
        m_i = m_new
    return m_i, l_i, acc


# The block-table row stride changes with the longest sequence of a step: not specialising on
# it keeps one compiled variant instead of three (==1, %16 == 0, other).
@triton.jit(do_not_specialize=["stride_bt_seq"])
def _decode_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    k_scale_ptr,
    v_scale_ptr,
    block_table_ptr,
    seq_lens_ptr,
    kv_start_ptr,
    out_ptr,
    part_out_ptr,
    part_lse_ptr,
    qk_scale,
    stride_q_tok,
    stride_q_head,
    stride_bt_seq,
    stride_c_blk,
    stride_c_tok,
    stride_o_tok,
    stride_o_head,
    num_heads,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    FP8: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    KV_START: tl.constexpr,
    NUM_SLOTS: tl.constexpr,
    FP16_DOT: tl.constexpr,
    FOLD_PREFIX: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    seq_len = tl.load(seq_lens_ptr + seq)
    first = 0
    if KV_START:  # the shared prefix before it is attended by the group's program
        first = tl.load(kv_start_ptr + seq)
    num_tiles = tl.cdiv(seq_len - first, BLOCK_N)
    tiles_per_split = tl.cdiv(num_tiles, NUM_SPLITS)
    tile_lo = split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + g
    g_mask = g < GROUP
    d_mask = d < HEAD_DIM
    q = tl.load(
        q_ptr + seq.to(tl.int64) * stride_q_tok + heads[:, None] * stride_q_head + d[None, :],
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    )  # [GROUP_PAD, BLOCK_D]
    if UPCAST:
        q = q.to(tl.float32)
    if FP16_DOT:  # FP8 tiles below convert to q's dtype: fp16 (kernels.fp16_dot)
        q = q.to(tl.float16)

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, BLOCK_D], tl.float32)
    bt_row = block_table_ptr + seq.to(tl.int64) * stride_bt_seq
    for tile in range(tile_lo, tile_hi):
        n = first + tile * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = n < seq_len
        k, v, k_s, v_s = load_kv_tile(
            k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, bt_row, n, n_mask, d, kv_head,
            stride_c_blk, stride_c_tok, q.dtype, PAGE, HEAD_DIM, BLOCK_D, NUM_KV_HEADS, FP8,
            UPCAST,
        )  # fmt: skip
        m_i, l_i, acc = attend_tile(
            q, k, v, k_s, v_s, n_mask[None, :], m_i, l_i, acc, qk_scale, True, FP8, PRECISION
        )

    o_mask = g_mask[:, None] & d_mask[None, :]
    if FOLD_PREFIX:
        # One split: the prefix partials (written before this launch) are merged here, so
        # the step needs no merge kernel. Slots [1, NUM_SLOTS) hold them; 0 is unused.
        # first > 0 broadcast to the rows: the interpreter takes no scalar in a load mask.
        grouped = g_mask & (g * 0 + first > 0)
        m_i, l_i, acc = _fold_partials(
            part_out_ptr, part_lse_ptr, seq, heads, d, grouped, d_mask, m_i, l_i, acc,
            num_heads, HEAD_DIM, NUM_SLOTS,
        )  # fmt: skip
    if NUM_SLOTS == 1 or FOLD_PREFIX:
        # seq_len 0 (graph padding) leaves l_i = 0: write zeros, not NaN.
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        o_ptrs = out_ptr + seq.to(tl.int64) * stride_o_tok + heads[:, None] * stride_o_head
        tl.store(o_ptrs + d[None, :], out.to(out_ptr.dtype.element_ty), mask=o_mask)
    else:
        # Partials: part_out [num_seqs, NUM_SLOTS, num_heads, HEAD_DIM] fp32,
        # part_lse [num_seqs, NUM_SLOTS, num_heads] fp32 (log2 domain, -inf = empty split);
        # slots [0, NUM_SPLITS) are the splits, a last one the shared prefix's.
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        base = (seq.to(tl.int64) * NUM_SLOTS + split) * num_heads + heads
        tl.store(part_out_ptr + base[:, None] * HEAD_DIM + d[None, :], out, mask=o_mask)
        tl.store(part_lse_ptr + base, lse, mask=g_mask)


@triton.jit
def _merge_kernel(
    part_out_ptr,
    part_lse_ptr,
    kv_start_ptr,
    out_ptr,
    stride_o_tok,
    stride_o_head,
    num_heads,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    NUM_SLOTS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
):
    # One program per (sequence, query head): softmax-weighted sum of the split partials,
    # and of the shared-prefix partials (the last slots) where the sequence has a group.
    seq = tl.program_id(0)
    head = tl.program_id(1)
    sp = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, BLOCK_D)
    used = NUM_SPLITS
    if NUM_SLOTS > NUM_SPLITS:
        has_group = (tl.load(kv_start_ptr + seq) > 0).to(tl.int32)
        used = NUM_SPLITS + (NUM_SLOTS - NUM_SPLITS) * has_group
    sp_mask = sp < used
    base = (seq.to(tl.int64) * NUM_SLOTS + sp) * num_heads + head  # [SPLITS_PAD]
    lse = tl.load(part_lse_ptr + base, mask=sp_mask, other=float("-inf"))
    m = tl.max(lse, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m_safe)  # empty splits: exp2(-inf) = 0
    parts = tl.load(
        part_out_ptr + base[:, None] * HEAD_DIM + d[None, :],
        mask=sp_mask[:, None] & (d[None, :] < HEAD_DIM),
        other=0.0,
    )
    total = tl.sum(w, 0)
    out = tl.sum(parts * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    o_ptrs = out_ptr + seq.to(tl.int64) * stride_o_tok + head * stride_o_head + d
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


def choose_num_splits(
    num_seqs: int, num_kv_heads: int, max_seq_len: int, num_sms: int = 132, block_n: int = 64
) -> int:
    """Splits so that programs ≈ 2 waves of the SMs, each split keeping ≥ 4 tiles of work,
    rounded down to a power of two (each split count is its own compiled kernel: the set
    stays small and is compiled when the decode graphs are captured).

    Depends only on host ints, so a graph captured for a batch size can fix it."""
    programs = max(1, num_seqs * num_kv_heads)
    want = triton.cdiv(2 * num_sms, programs)
    cap = max(1, triton.cdiv(max_seq_len, 4 * block_n))
    splits = max(1, min(want, cap, 64))
    return 1 << (splits.bit_length() - 1)


def launch_constants(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    kv_scales: tuple[torch.Tensor, torch.Tensor] | None,
    num_splits: int,
    block_n: int | None = None,
) -> dict[str, Any]:
    """The decode kernel's constexprs for this launch (the shared-prefix kernel takes its
    own from them); ``block_n`` None: the tile width for q's dtype and the cache's."""
    common = tile_constants(q, k_cache, kv_scales)
    if block_n is None:
        # fp32 (tests, parity runs) does exact fp32 dots on CUDA cores: smaller tiles keep
        # the accumulators in registers (64 spills to local memory with split-K). An FP8
        # cache reads half the bytes per tile: FP8_KV_TILE keys (128 by default: in 3 stages
        # on the H100 1.19-1.47x the bf16 kernel; benchmarks.md).
        block_n = 32 if q.element_size() > 2 else FP8_KV_TILE if kv_scales is not None else 64
    return dict(
        common,
        GROUP_PAD=max(16, triton.next_power_of_2(common["GROUP"])),
        BLOCK_N=block_n,
        NUM_SPLITS=num_splits,
    )


def decode_stages(common: dict[str, Any]) -> int:
    """Pipelining stages of the decode loop: 3 for FP8 tiles of 128 keys (on the H100 1.03-1.26x
    faster than 2 on all four bench shapes, benchmarks.md; at 64 keys 3 is slower), else 2."""
    return 3 if common["FP8"] and common["BLOCK_N"] == 128 else 2


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    num_splits: int = 1,
    out: torch.Tensor | None = None,
    block_n: int | None = None,
    kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
    shared: SharedPrefix | None = None,
    prefix_splits: int | None = None,
    num_stages: int | None = None,
    max_registers: int | None = None,
) -> torch.Tensor:
    """q: [num_seqs, num_heads, head_dim] (one token each, the last of its sequence);
    caches: [num_blocks, page, num_kv_heads, head_dim]; block_tables: [num_seqs, max_blocks]
    int32; seq_lens: [num_seqs] int32 context length including this token (0 = padding,
    output zeros). Returns out: [num_seqs, num_heads, head_dim] in q's dtype. An FP8 cache
    (V page-major, ``gpu_engine.fp8``) comes with ``kv_scales``: K and V scales [num_blocks,
    page, num_kv_heads] fp32.
    ``shared``: groups of these sequences with a common cached prefix (attended once per
    group in ``prefix_splits`` parts, by default ``choose_prefix_splits`` for 132 SMs,
    merged with each sequence's own suffix). ``num_stages``: Triton's software pipelining of
    the decode loop (None: ``decode_stages``), ``max_registers``: a cap on the decode program's
    registers a thread (ptxas spills past it; more programs an SM): the bench's A/Bs."""
    num_seqs, num_heads, head_dim = q.shape
    _, _, num_kv_heads, cache_dim = k_cache.shape
    if cache_dim != head_dim or num_heads % num_kv_heads:
        raise ValueError(f"q {tuple(q.shape)} vs cache {tuple(k_cache.shape)}")
    if q.stride(2) != 1:
        raise ValueError("q rows must be contiguous in head_dim")
    k_scales, v_scales = check_kv_cache(k_cache, v_cache, kv_scales)
    if out is None:
        out = torch.empty_like(q)
    if num_seqs == 0:
        return out
    common = launch_constants(q, k_cache, kv_scales, num_splits, block_n)
    if shared is None:
        prefix_splits = 0
    elif prefix_splits is None:
        prefix_splits = choose_prefix_splits(shared.tile_group.shape[0], num_kv_heads)
    elif prefix_splits < 1:
        raise ValueError(f"prefix_splits must be >= 1, got {prefix_splits}")
    num_slots = num_splits + prefix_splits
    if num_slots == 1:
        part_out = part_lse = out  # unused
    else:
        part_out = torch.empty(
            (num_seqs, num_slots, num_heads, head_dim), dtype=torch.float32, device=q.device
        )
        part_lse = torch.empty(
            (num_seqs, num_slots, num_heads), dtype=torch.float32, device=q.device
        )
    kv_start = seq_lens if shared is None else shared.kv_start  # unused without sharing
    if shared is not None:
        launch_prefix_attention(
            q, k_cache, v_cache, (k_scales, v_scales), shared, part_out, part_lse, scale,
            num_splits, prefix_splits, common,
        )  # fmt: skip
    # One split: the decode program folds the prefix partials in itself (no merge launch).
    fold = shared is not None and num_splits == 1 and FOLD_PREFIX
    _decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        k_scales,
        v_scales,
        block_tables,
        seq_lens,
        kv_start,
        out,
        part_out,
        part_lse,
        scale * _LOG2E,
        q.stride(0),
        q.stride(1),
        block_tables.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        out.stride(0),
        out.stride(1),
        num_heads,
        num_warps=4,
        num_stages=decode_stages(common) if num_stages is None else num_stages,
        **({} if max_registers is None else {"maxnreg": max_registers}),
        KV_START=shared is not None,
        NUM_SLOTS=num_slots,
        FOLD_PREFIX=fold,
        **common,
    )
    if num_slots > 1 and not fold:
        _merge_kernel[(num_seqs, num_heads)](
            part_out,
            part_lse,
            kv_start,
            out,
            out.stride(0),
            out.stride(1),
            num_heads,
            HEAD_DIM=head_dim,
            BLOCK_D=common["BLOCK_D"],
            NUM_SPLITS=num_splits,
            NUM_SLOTS=num_slots,
            SPLITS_PAD=max(2, triton.next_power_of_2(num_slots)),
            num_warps=4,
        )
    return out
