"""Attention backend on our own Triton kernels (the default on CUDA without flash-attn).

Per step: store this step's K/V by slot mapping; the leading prefill / chunked-prefill
sequences go through the paged FlashAttention-2 kernel (prefix hits read from the cache);
the trailing decode sequences through the split-K paged decode kernel. Given the prefill
tile table and token count in the metadata, neither part needs host values beyond launch
constants, so the model runner captures decode-only and mixed steps in CUDA graphs; the split
count then comes from ``meta.max_seq_len`` at capture time (the runner passes its max model
length there), see ``decode_num_splits``.
"""

from __future__ import annotations

import torch

from gpu_engine.kernels.decode_attention import choose_num_splits, paged_decode_attention
from gpu_engine.kernels.kv_cache import store_kv_cache
from gpu_engine.kernels.prefill_attention import paged_prefill_attention
from gpu_engine.kernels.prefill_tiles import prefill_block_m, prefill_tiles
from gpu_engine.kernels.shared_prefix import choose_prefix_splits
from gpu_engine.layers.base import AttentionMetadata, SharedPrefix


class TritonBackend:
    name = "triton"
    # Any page size works (keys are gathered per token); no constraint for the engine.
    required_block_size: int | None = None

    def __init__(self) -> None:
        self._num_sms = (
            torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
            if torch.cuda.is_available()
            else 132
        )

    def decode_num_splits(self, num_seqs: int, num_kv_heads: int, max_seq_len: int) -> int:
        return choose_num_splits(num_seqs, num_kv_heads, max_seq_len, self._num_sms)

    def prefix_splits(self, shared: SharedPrefix | None, num_kv_heads: int) -> int | None:
        """The shared-prefix kernel's splits (from the staging's fixed tile capacity)."""
        if shared is None:
            return None
        return choose_prefix_splits(shared.tile_group.shape[0], num_kv_heads, self._num_sms)

    @staticmethod
    def _build_tiles(meta: AttentionMetadata, q: torch.Tensor) -> None:
        """The step's prefill tile table from the host query lengths, built once per step
        (the first layer stores it in ``meta``; no device read). CUDA graphs of mixed steps
        bring a static one instead."""
        block_m = prefill_block_m(q.dtype, meta.max_query_len)
        tiles = torch.from_numpy(
            prefill_tiles(meta.query_lens_host[: meta.num_prefill_seqs], block_m)
        )
        if q.is_cuda:
            tiles = tiles.pin_memory()
        meta.prefill_tiles = tiles.to(q.device, non_blocking=True)
        meta.prefill_block_m = block_m

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        # q: [T, H, D]; k, v: [T, KVH, D]; caches [num_blocks, block_size, KVH, D] (FP8:
        # with kv_scales [num_blocks, block_size, KVH]).
        store_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping, kv_scales)
        out = torch.empty_like(q)
        num_prefill = meta.num_prefill_seqs
        prefill_tokens = 0
        if num_prefill:
            prefill_tokens = meta.prefill_token_count
            if meta.prefill_tiles is None:
                self._build_tiles(meta, q)
            paged_prefill_attention(
                q[:prefill_tokens],
                k_cache,
                v_cache,
                meta.block_tables[:num_prefill],
                meta.cu_seqlens_q[: num_prefill + 1],
                meta.seq_lens[:num_prefill],
                meta.max_query_len,
                scale,
                out=out[:prefill_tokens],
                tiles=meta.prefill_tiles,
                block_m=meta.prefill_block_m,
                kv_scales=kv_scales,
            )
        num_decode = meta.num_decode_seqs
        if num_decode:
            splits = self.decode_num_splits(num_decode, k_cache.shape[2], meta.max_seq_len)
            block_tables, seq_lens = meta.block_tables, meta.seq_lens
            if num_prefill:
                # Fresh 16-byte-aligned copies: Triton specialises kernels on pointer
                # alignment, and a slice at an odd row would compile another variant.
                block_tables = block_tables[num_prefill:].clone()
                seq_lens = seq_lens[num_prefill:].clone()
            shared = meta.shared if not num_prefill else None
            paged_decode_attention(
                q[prefill_tokens : prefill_tokens + num_decode],
                k_cache,
                v_cache,
                block_tables,
                seq_lens,
                scale,
                num_splits=splits,
                out=out[prefill_tokens : prefill_tokens + num_decode],
                kv_scales=kv_scales,
                shared=shared,
                prefix_splits=self.prefix_splits(shared, k_cache.shape[2]),
            )
        return out
