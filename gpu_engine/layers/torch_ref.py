"""Reference attention backend in plain torch: correct everywhere, fast nowhere.

Handles the paged cache, prefix hits and chunked prefill: each sequence's K/V is gathered
through its block table (cached prefix + earlier chunks + this step's tokens) and its queries
attend causally with an offset (query j sits at position ``seq_len - query_len + j``).
Prefill sequences are attended one at a time; the trailing decode sequences in one batched
call over K/V padded to the longest of them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gpu_engine.layers.base import AttentionMetadata


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write this step's k, v [T, KVH, D] into cache slots ``slot_mapping`` [T] (-1 = skip)."""
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    flat_k = k_cache.view(-1, num_kv_heads, head_dim)  # [num_blocks * block_size, KVH, D]
    flat_v = v_cache.view(-1, num_kv_heads, head_dim)
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        k, v, slot_mapping = k[valid], v[valid], slot_mapping[valid]
    flat_k.index_copy_(0, slot_mapping, k.to(flat_k.dtype))
    flat_v.index_copy_(0, slot_mapping, v.to(flat_v.dtype))


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The first ``seq_len`` tokens of one sequence: [seq_len, KVH, D]."""
    block_size = cache.shape[1]
    num_blocks = -(-seq_len // block_size)
    blocks = cache[block_table[:num_blocks].long()]  # [nb, block_size, KVH, D]
    return blocks.reshape(-1, cache.shape[2], cache.shape[3])[:seq_len]


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
    ) -> torch.Tensor:
        store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        query_lens, seq_lens = meta.query_lens_host, meta.seq_lens_host
        start = 0
        for i in range(meta.num_prefill_seqs):
            query_len, seq_len = query_lens[i], seq_lens[i]
            keys = gather_kv(k_cache, meta.block_tables[i], seq_len)  # [L, KVH, D]
            values = gather_kv(v_cache, meta.block_tables[i], seq_len)
            q_pos = torch.arange(seq_len - query_len, seq_len, device=q.device)
            mask = torch.arange(seq_len, device=q.device)[None, :] <= q_pos[:, None]  # [Q, L]
            o = F.scaled_dot_product_attention(
                q[start : start + query_len].transpose(0, 1),  # [H, Q, D]
                keys.transpose(0, 1).to(q.dtype),  # [KVH, L, D]
                values.transpose(0, 1).to(q.dtype),
                attn_mask=mask,
                scale=scale,
                enable_gqa=True,
            )
            out[start : start + query_len] = o.transpose(0, 1)
            start += query_len
        if meta.num_decode_seqs:
            out[start:] = self._decode(q[start:], k_cache, v_cache, meta, scale)
        return out

    def _decode(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
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
        slots = tables.gather(1, clamped // block_size) * block_size + clamped % block_size
        keys = k_cache.view(-1, num_kv_heads, head_dim)[slots]  # [N, L, KVH, D]
        values = v_cache.view(-1, num_kv_heads, head_dim)[slots]
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
