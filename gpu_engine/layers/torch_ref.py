"""Reference attention backend in plain torch: correct everywhere, fast nowhere.

Handles the paged cache, prefix hits and chunked prefill: each sequence's K/V is gathered
through its block table (cached prefix + earlier chunks + this step's tokens) and its queries
attend causally with an offset (query j sits at position ``seq_len - query_len + j``).
Prefill sequences are attended one at a time; the trailing decode sequences in one batched
call over K/V padded to the longest of them.

An FP8 cache (``kv_scales`` given) is written through ``gpu_engine.fp8.quantize_rows`` (one
scale per token and KV head) and read back dequantized to the query dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gpu_engine.fp8 import FP8_DTYPE, dequantize_rows, quantize_rows
from gpu_engine.layers.base import AttentionMetadata

KVScales = tuple[torch.Tensor, torch.Tensor]


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_scales: KVScales | None = None,
) -> None:
    """Write this step's k, v [T, KVH, D] into cache slots ``slot_mapping`` [T] (-1 = skip);
    an FP8 cache gets e4m3 values and their scales [num_blocks, block_size, KVH]."""
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        k, v, slot_mapping = k[valid], v[valid], slot_mapping[valid]
    # (block, offset) indexing writes through any layout: an FP8 V cache is page-major.
    blocks, offsets = slot_mapping // k_cache.shape[1], slot_mapping % k_cache.shape[1]
    for new, cache, scales in zip(
        (k, v), (k_cache, v_cache), kv_scales or (None, None), strict=True
    ):
        if cache.dtype == FP8_DTYPE:
            if scales is None:
                raise ValueError("an FP8 KV cache needs its scale tensors")
            values, row_scales = quantize_rows(new)  # [T, KVH, D], [T, KVH]
            # index_put_ has no float8 kernel on the CPU: write the bytes.
            cache.view(torch.uint8)[blocks, offsets] = values.view(torch.uint8)
            scales[blocks, offsets] = row_scales
        else:
            cache[blocks, offsets] = new.to(cache.dtype)


def _take(cache: torch.Tensor, *index: torch.Tensor) -> torch.Tensor:
    """``cache[index]``; FP8 through a byte view (indexing kernels lack float8 types)."""
    if cache.dtype == FP8_DTYPE:
        return cache.view(torch.uint8)[index].view(FP8_DTYPE)
    return cache[index]


def gather_kv(
    cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_len: int,
    scales: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The first ``seq_len`` tokens of one sequence: [seq_len, KVH, D] (in ``dtype``,
    dequantized through ``scales`` for an FP8 cache)."""
    block_size = cache.shape[1]
    num_blocks = -(-seq_len // block_size)
    ids = block_table[:num_blocks].long()
    rows = _take(cache, ids).reshape(-1, cache.shape[2], cache.shape[3])[:seq_len]
    if scales is not None:
        row_scales = scales[ids].reshape(-1, cache.shape[2])[:seq_len]
        return dequantize_rows(rows, row_scales, dtype or torch.float32)
    return rows if dtype is None else rows.to(dtype)


class TorchRefBackend:
    name = "torch"

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        kv_scales: KVScales | None = None,
    ) -> torch.Tensor:
        store_kv(k, v, k_cache, v_cache, meta.slot_mapping, kv_scales)
        k_scales, v_scales = kv_scales or (None, None)
        out = torch.empty_like(q)
        query_lens, seq_lens = meta.query_lens_host, meta.seq_lens_host
        start = 0
        for i in range(meta.num_prefill_seqs):
            query_len, seq_len = query_lens[i], seq_lens[i]
            table = meta.block_tables[i]
            keys = gather_kv(k_cache, table, seq_len, k_scales, q.dtype)  # [L, KVH, D]
            values = gather_kv(v_cache, table, seq_len, v_scales, q.dtype)
            q_pos = torch.arange(seq_len - query_len, seq_len, device=q.device)
            mask = torch.arange(seq_len, device=q.device)[None, :] <= q_pos[:, None]  # [Q, L]
            o = F.scaled_dot_product_attention(
                q[start : start + query_len].transpose(0, 1),  # [H, Q, D]
                keys.transpose(0, 1),  # [KVH, L, D]
                values.transpose(0, 1),
                attn_mask=mask,
                scale=scale,
                enable_gqa=True,
            )
            out[start : start + query_len] = o.transpose(0, 1)
            start += query_len
        if meta.num_decode_seqs:
            out[start:] = self._decode(q[start:], k_cache, v_cache, meta, scale, kv_scales)
        return out

    def _decode(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        kv_scales: KVScales | None,
    ) -> torch.Tensor:
        # q: [N, H, D], one query per decode sequence, at the last position of each.
        first = meta.num_prefill_seqs
        n, num_heads, head_dim = q.shape
        block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
        groups = num_heads // num_kv_heads
        max_len = max(meta.seq_lens_host[first:])
        seq_lens = meta.seq_lens[first : first + n].long()[:, None]  # [N, 1]
        pos = torch.arange(max_len, device=q.device)[None, :]  # [1, L]
        # Padding positions re-read the sequence's last real slot: finite whatever the
        # cache holds elsewhere (a masked NaN would still poison the weighted sum).
        clamped = torch.minimum(pos, seq_lens - 1)  # [N, L]
        tables = meta.block_tables[first : first + n].long()
        blocks, offsets = tables.gather(1, clamped // block_size), clamped % block_size
        keys = _take(k_cache, blocks, offsets)  # [N, L, KVH, D]
        values = _take(v_cache, blocks, offsets)
        if kv_scales is not None:
            k_scales, v_scales = (s[blocks, offsets] for s in kv_scales)
            keys = dequantize_rows(keys, k_scales, q.dtype)
            values = dequantize_rows(values, v_scales, q.dtype)
        # Grouped-query attention without expanding K/V: the query heads sharing a KV head
        # (heads g*G .. g*G+G-1 use KV head g) act as G queries against it.
        o = F.scaled_dot_product_attention(
            q.view(n, num_kv_heads, groups, head_dim),  # [N, KVH, G, D]
            keys.transpose(1, 2).to(q.dtype),  # [N, KVH, L, D]
            values.transpose(1, 2).to(q.dtype),
            attn_mask=(pos < seq_lens)[:, None, None, :],  # [N, 1, 1, L]
            scale=scale,
        )
        return o.reshape(n, num_heads, head_dim)
