"""Attention backend on the flash-attn package (used when ``import flash_attn`` works).

Prefill / chunked prefill: ``flash_attn_varlen_func`` with ``block_table`` reads every key of
each sequence (cached prefix included) straight from the paged cache; its causal mask is
aligned bottom-right, which is exactly "query j sits at seq_len - query_len + j".
Decode: ``flash_attn_with_kvcache`` with ``cache_seqlens`` = context length including the
new token (already stored by us, so no k/v are passed) and ``block_table``.
flash-attn's paged KV needs a page size that is a multiple of 256: the engine must use
``block_size = required_block_size`` with this backend.
"""

from __future__ import annotations

import flash_attn  # noqa: F401  (ImportError here makes the engine fall back to Triton)
import torch
from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache

from gpu_engine.errors import EngineError
from gpu_engine.layers.base import AttentionMetadata
from gpu_engine.layers.torch_ref import store_kv


def _store(k: torch.Tensor, v: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
           slots: torch.Tensor) -> None:  # fmt: skip
    if k.is_cuda:
        from gpu_engine.kernels.kv_cache import store_kv_cache

        store_kv_cache(k, v, kc, vc, slots)
    else:
        store_kv(k, v, kc, vc, slots)


class FlashAttnBackend:
    name = "flash_attn"
    required_block_size: int | None = 256

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
        # q: [T, H, D]; k, v: [T, KVH, D]; caches [num_blocks, block_size, KVH, D].
        if kv_scales is not None:
            raise EngineError(
                "the flash_attn backend has no FP8 KV cache: use attention_backend='triton'"
            )
        if k_cache.shape[1] % 256:
            raise EngineError(
                f"flash-attn paged KV needs block_size % 256 == 0, got {k_cache.shape[1]}"
            )
        _store(k, v, k_cache, v_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        num_prefill = meta.num_prefill_seqs
        prefill_tokens = 0
        if num_prefill:
            prefill_tokens = sum(meta.query_lens_host[:num_prefill])
            seq_lens = meta.seq_lens[:num_prefill]
            cu_seqlens_k = torch.zeros(num_prefill + 1, dtype=torch.int32, device=q.device)
            cu_seqlens_k[1:] = torch.cumsum(seq_lens, 0)
            out[:prefill_tokens] = flash_attn_varlen_func(
                q[:prefill_tokens],
                k_cache,
                v_cache,
                cu_seqlens_q=meta.cu_seqlens_q[: num_prefill + 1],
                cu_seqlens_k=cu_seqlens_k,
                max_seqlen_q=meta.max_query_len,
                max_seqlen_k=meta.max_seq_len,
                softmax_scale=scale,
                causal=True,
                block_table=meta.block_tables[:num_prefill],
            )
        num_decode = meta.num_decode_seqs
        if num_decode:
            end = prefill_tokens + num_decode
            o = flash_attn_with_kvcache(
                q[prefill_tokens:end].unsqueeze(1),  # [N, 1, H, D]
                k_cache,
                v_cache,
                cache_seqlens=meta.seq_lens[num_prefill:],
                block_table=meta.block_tables[num_prefill:],
                softmax_scale=scale,
                causal=True,
            )
            out[prefill_tokens:end] = o.squeeze(1)
        return out
