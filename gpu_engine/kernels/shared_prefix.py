"""Attention of a group's decode queries over the group's shared prefix, its KV read once.

A group (``gpu_engine.prefix_groups``) is a set of decode sequences whose block tables
start with the same ``prefix_len`` tokens of cached blocks. One program handles one tile of
up to BLOCK_S members and one KV head: its rows are the (member, query head of that KV head)
pairs, BLOCK_S x GROUP_PAD of them, so a [BLOCK_N, head_dim] K/V tile of the prefix is read
once and serves every member of the tile (a tensor-core product with BLOCK_S x GROUP_PAD
rows instead of GROUP_PAD). No causal mask: the whole prefix precedes every member's query.

The prefix's tiles are split between PREFIX_SPLITS programs per (tile, KV head) so that a
batch of a few tiles still fills the GPU (at 256 sequences of GQA 6, one group is 32 tiles x
2 KV heads: 64 programs, half the H100's SMs, each walking the whole prefix alone). Each
writes a partial result (the output normalised by its own softmax sum, and the log-sum-exp
in base 2) into the decode kernel's split partials at slot ``part_slot`` + its split; the
decode kernel covers each member's suffix ``[prefix_len, seq_len)`` and the merge kernel
combines them all by log-sum-exp (``decode_attention``). Tiles are read and attended as there
(``kernels.kv_tiles``), FP8 caches included.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from gpu_engine.kernels.kv_tiles import attend_tile, load_kv_tile
from gpu_engine.layers.base import SharedPrefix
from gpu_engine.prefix_groups import prefix_block_s

LOG2E = 1.4426950408889634


@triton.jit
def _prefix_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    k_scale_ptr,
    v_scale_ptr,
    tile_group_ptr,
    tile_members_ptr,
    group_tables_ptr,
    group_lens_ptr,
    part_out_ptr,
    part_lse_ptr,
    qk_scale,
    stride_q_tok,
    stride_q_head,
    stride_gt,
    stride_c_blk,
    stride_c_tok,
    num_heads,
    part_slot,
    NUM_SLOTS: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BLOCK_S: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    FP8: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    FP16_DOT: tl.constexpr,
    PREFIX_SPLITS: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    psplit = tl.program_id(2)
    group = tl.load(tile_group_ptr + tile)
    # Padding tiles (group -1) of a graph's fixed grid have nothing to do.
    if group >= 0:
        prefix_len = tl.load(group_lens_ptr + group)
        r = tl.arange(0, BLOCK_S * GROUP_PAD)
        g = r % GROUP_PAD
        member = tl.load(tile_members_ptr + tile * BLOCK_S + r // GROUP_PAD)
        valid = (member >= 0) & (g < GROUP)
        member = tl.where(member >= 0, member, 0).to(tl.int64)
        heads = kv_head * GROUP + g
        d = tl.arange(0, BLOCK_D)
        d_mask = d < HEAD_DIM
        q = tl.load(
            q_ptr + member[:, None] * stride_q_tok + heads[:, None] * stride_q_head + d[None, :],
            mask=valid[:, None] & d_mask[None, :],
            other=0.0,
        )  # [BLOCK_S * GROUP_PAD, BLOCK_D]
        if UPCAST:
            q = q.to(tl.float32)
        if FP16_DOT:  # FP8 tiles convert to q's dtype: fp16 (kernels.fp16_dot)
            q = q.to(tl.float16)
        m_i = tl.full([BLOCK_S * GROUP_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_S * GROUP_PAD], tl.float32)
        acc = tl.zeros([BLOCK_S * GROUP_PAD, BLOCK_D], tl.float32)
        bt_row = group_tables_ptr + group.to(tl.int64) * stride_gt
        per_split = tl.cdiv(tl.cdiv(prefix_len, BLOCK_N), PREFIX_SPLITS) * BLOCK_N
        lo = psplit * per_split
        hi = tl.minimum(lo + per_split, prefix_len)
        for start in range(lo, hi, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            n_mask = n < prefix_len
            k, v, k_s, v_s = load_kv_tile(
                k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, bt_row, n, n_mask, d,
                kv_head, stride_c_blk, stride_c_tok, q.dtype, PAGE, HEAD_DIM, BLOCK_D,
                NUM_KV_HEADS, FP8, UPCAST,
            )  # fmt: skip
            m_i, l_i, acc = attend_tile(
                q, k, v, k_s, v_s, n_mask[None, :], m_i, l_i, acc, qk_scale, True, FP8,
                PRECISION,
            )  # fmt: skip
        safe_l = tl.where(l_i > 0, l_i, 1.0)
        out = acc / safe_l[:, None]
        lse = tl.where(l_i > 0, m_i + tl.log2(safe_l), float("-inf"))
        base = (member * NUM_SLOTS + part_slot + psplit) * num_heads + heads
        tl.store(
            part_out_ptr + base[:, None] * HEAD_DIM + d[None, :],
            out,
            mask=valid[:, None] & d_mask[None, :],
        )
        tl.store(part_lse_ptr + base, lse, mask=valid)


def choose_prefix_splits(num_tiles: int, num_kv_heads: int, num_sms: int = 132) -> int:
    """Prefix splits so that the prefix kernel's programs ≈ 2 waves of the SMs, at most 8,
    a power of two. Depends only on host ints (``num_tiles``: the staging's fixed tile
    capacity), so a captured graph can fix it."""
    want = triton.cdiv(2 * num_sms, max(1, num_tiles * num_kv_heads))
    splits = max(1, min(want, 8))
    return 1 << (splits.bit_length() - 1)


def launch_prefix_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    scales: tuple[torch.Tensor, torch.Tensor],
    shared: SharedPrefix,
    part_out: torch.Tensor,
    part_lse: torch.Tensor,
    scale: float,
    num_splits: int,
    prefix_splits: int,
    common: dict[str, Any],
) -> None:
    """The groups' prefix partials into the last ``prefix_splits`` slots of ``part_out`` /
    ``part_lse`` ([num_seqs, num_splits + prefix_splits, ...]); ``common``: the decode
    launch's constants."""
    block_s = shared.tile_members.shape[1]
    if block_s != prefix_block_s(common["GROUP"]):
        raise ValueError(
            f"tiles of {block_s} members, the kernel wants {prefix_block_s(common['GROUP'])}"
        )
    num_kv_heads = k_cache.shape[2]
    _prefix_kernel[(shared.tile_group.shape[0], num_kv_heads, prefix_splits)](
        q,
        k_cache,
        v_cache,
        scales[0],
        scales[1],
        shared.tile_group,
        shared.tile_members,
        shared.group_tables,
        shared.group_lens,
        part_out,
        part_lse,
        scale * LOG2E,
        q.stride(0),
        q.stride(1),
        shared.group_tables.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        q.shape[1],
        num_splits,
        NUM_SLOTS=num_splits + prefix_splits,
        GROUP=common["GROUP"],
        GROUP_PAD=triton.next_power_of_2(common["GROUP"]),
        BLOCK_S=block_s,
        HEAD_DIM=common["HEAD_DIM"],
        BLOCK_D=common["BLOCK_D"],
        PAGE=common["PAGE"],
        # Decode's tile, 128 keys for an FP8 cache, though it takes every register (sm_90:
        # 255, 56 bytes spilled at GQA 2, none at 6): at 64 keys the spike workload ran at
        # 0.79x instead of 0.91x of the bf16 base on the H100 (benchmarks.md).
        BLOCK_N=common["BLOCK_N"],
        UPCAST=common["UPCAST"],
        PRECISION=common["PRECISION"],
        FP8=common["FP8"],
        FP16_DOT=common["FP16_DOT"],
        NUM_KV_HEADS=num_kv_heads,
        PREFIX_SPLITS=prefix_splits,
        num_warps=4,
        num_stages=2,
    )
