"""The attention-backend interface and the per-step attention metadata.

Every backend (torch reference, Triton, flash-attn) implements :class:`AttentionBackend`.
The model runner builds one :class:`AttentionMetadata` per step and sets it in the forward
context (``gpu_engine.context``); attention layers read it from there, so model ``forward``
takes only ``(input_ids, positions)``.

Token order in a step: sequences are laid out one after another; each contributes
``query_lens[i]`` new tokens (a prefill chunk, or 1 for a decode). Prefill/chunked-prefill
sequences come first, decode sequences (query_len == 1) last, so ``num_decode_seqs``
trailing sequences form the decode-only part that CUDA graphs capture.

KV cache layout per layer (flash-attn's paged layout):
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
Token t of sequence i lives at block ``block_tables[i, t // block_size]``, offset
``t % block_size``; ``slot_mapping[j] = block * block_size + offset`` for the j-th new token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class SharedPrefix:
    """Decode sequences grouped by a shared cached prefix (``gpu_engine.prefix_groups``), on
    the device: each group's prefix is attended once for all its members (one program per
    tile of members and KV head), each member's suffix from ``kv_start`` on by the decode
    kernel, merged by log-sum-exp. Capacities are fixed (CUDA graphs): padding tiles have
    group -1, padding members -1."""

    kv_start: torch.Tensor  # [num_decode_seqs] int32: prefix tokens covered (0 = no group)
    tile_group: torch.Tensor  # [tiles] int32: group of each tile, -1 = padding
    tile_members: torch.Tensor  # [tiles, block_s] int32: decode rows, -1 = padding
    group_tables: torch.Tensor  # [groups, max_blocks] int32: each group's prefix blocks
    group_lens: torch.Tensor  # [groups] int32: each group's prefix tokens


@dataclass
class AttentionMetadata:
    # [num_tokens] int64: cache slot of each new token (-1 = padding, do not store).
    slot_mapping: torch.Tensor
    # [num_seqs + 1] int32: prefix sums of query lengths (new tokens per sequence).
    cu_seqlens_q: torch.Tensor
    # [num_seqs] int32: total context length per sequence after this step's tokens
    # (cached prefix + previously computed + new).
    seq_lens: torch.Tensor
    # [num_seqs, max_blocks_per_seq] int32: physical block ids, padded with 0.
    block_tables: torch.Tensor
    max_query_len: int
    max_seq_len: int
    num_prefill_seqs: int
    num_decode_seqs: int
    # Host copies (lists) the reference backend and the runner use without a device sync.
    query_lens_host: list[int]
    seq_lens_host: list[int]
    # Tokens of the prefill part (a padded, fixed count in a CUDA graph of a mixed step;
    # None: the sum of the host query lengths), and the Triton backend's query tile table on
    # the device with its rows per tile (static in a mixed-step graph, else built by the
    # backend's first layer of the step; see kernels.prefill_tiles).
    num_prefill_tokens: int | None = None
    prefill_tiles: torch.Tensor | None = None
    prefill_block_m: int | None = None
    # Decode-only steps whose sequences share cached prefix blocks (None: attend alone).
    shared: SharedPrefix | None = None

    @property
    def prefill_token_count(self) -> int:
        if self.num_prefill_tokens is not None:
            return self.num_prefill_tokens
        return sum(self.query_lens_host[: self.num_prefill_seqs])

    @property
    def num_seqs(self) -> int:
        return self.num_prefill_seqs + self.num_decode_seqs


class AttentionBackend(Protocol):
    """Stores this step's K/V into the paged cache, then attends.

    q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim]
    (num_heads % num_kv_heads == 0: grouped-query attention). Causal within each sequence,
    query token j of sequence i sits at position ``seq_lens[i] - query_lens[i] + j``.
    Returns [num_tokens, num_heads, head_dim] in q's dtype. With an FP8 cache
    (``float8_e4m3fn``), ``kv_scales`` holds the K and V scales [num_blocks, block_size,
    num_kv_heads] fp32 (``gpu_engine.fp8``): the backend quantizes on store and dequantizes
    on read; a backend without FP8 support raises.
    """

    name: str

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
    ) -> torch.Tensor: ...
