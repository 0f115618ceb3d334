"""Random paged-attention cases and an fp64 reference, shared by the kernel/backend tests.

A case is a list of (context_len, query_len) pairs: sequence i already has ``context_len``
tokens in the cache (cached prefix / earlier chunks / earlier decode steps) and brings
``query_len`` new ones. Physical blocks are a random permutation of a larger pool, the
second sequence shares its first ``shared_blocks`` physical blocks with the first (prefix
caching), and every cache slot that holds no key is NaN, so a kernel that reads past a
sequence's length or into a foreign block cannot pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gpu_engine.fp8 import quantize_rows, to_page_major
from gpu_engine.layers.base import AttentionMetadata


@dataclass
class PagedCase:
    q: torch.Tensor  # [T, H, D] new tokens, sequences back to back
    k_new: torch.Tensor  # [T, KVH, D]
    v_new: torch.Tensor
    k_full: list[torch.Tensor]  # per sequence [L, KVH, D], fp32 (prefix + new)
    v_full: list[torch.Tensor]
    k_cache: torch.Tensor  # [num_blocks, page, KVH, D]; prefix stored, or everything
    v_cache: torch.Tensor
    meta: AttentionMetadata
    specs: list[tuple[int, int]]


def make_case(
    specs: list[tuple[int, int]],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    page: int,
    dtype: torch.dtype,
    device: str,
    *,
    shared_blocks: int = 0,
    store_new: bool = True,
    seed: int = 0,
) -> PagedCase:
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [c + n for c, n in specs]
    blocks_needed = [-(-length // page) for length in seq_lens]
    if shared_blocks:
        assert len(specs) >= 2 and shared_blocks * page <= min(specs[0][0], specs[1][0])
    pool = sum(blocks_needed) + 3  # spare blocks stay NaN
    perm = torch.randperm(pool, generator=gen).tolist()
    tables: list[list[int]] = []
    for i, nb in enumerate(blocks_needed):
        own = [perm.pop() for _ in range(nb - (shared_blocks if i == 1 else 0))]
        tables.append(tables[0][:shared_blocks] + own if i == 1 and shared_blocks else own)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float32)

    k_full = [rnd(length, num_kv_heads, head_dim) for length in seq_lens]
    v_full = [rnd(length, num_kv_heads, head_dim) for length in seq_lens]
    if shared_blocks:
        n_shared = shared_blocks * page
        k_full[1][:n_shared] = k_full[0][:n_shared]
        v_full[1][:n_shared] = v_full[0][:n_shared]
    # Round through the cache dtype so the reference sees exactly what the kernel sees.
    k_full = [t.to(dtype).float() for t in k_full]
    v_full = [t.to(dtype).float() for t in v_full]

    nan = float("nan")
    k_cache = torch.full((pool, page, num_kv_heads, head_dim), nan, dtype=dtype)
    v_cache = torch.full_like(k_cache, nan)
    slots: list[int] = []
    for i, (ctx, n) in enumerate(specs):
        for t in range(ctx + n):
            slot = tables[i][t // page] * page + t % page
            if t >= ctx:
                slots.append(slot)
            if t < ctx or store_new:
                k_cache.view(-1, num_kv_heads, head_dim)[slot] = k_full[i][t].to(dtype)
                v_cache.view(-1, num_kv_heads, head_dim)[slot] = v_full[i][t].to(dtype)

    q = torch.cat([rnd(n, num_heads, head_dim) for _, n in specs]).to(dtype)
    k_new = torch.cat([k_full[i][c:] for i, (c, _) in enumerate(specs)]).to(dtype)
    v_new = torch.cat([v_full[i][c:] for i, (c, _) in enumerate(specs)]).to(dtype)
    max_blocks = max(blocks_needed)
    bt = torch.zeros((len(specs), max_blocks), dtype=torch.int32)
    for i, table in enumerate(tables):
        bt[i, : len(table)] = torch.tensor(table, dtype=torch.int32)
    query_lens = [n for _, n in specs]
    cu = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    num_decode = 0
    for n in reversed(query_lens):
        if n != 1:
            break
        num_decode += 1
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        cu_seqlens_q=cu.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=bt.to(device),
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        num_prefill_seqs=len(specs) - num_decode,
        num_decode_seqs=num_decode,
        query_lens_host=query_lens,
        seq_lens_host=seq_lens,
    )
    return PagedCase(
        q.to(device), k_new.to(device), v_new.to(device), k_full, v_full,
        k_cache.to(device), v_cache.to(device), meta, list(specs),
    )  # fmt: skip


def reference(case: PagedCase, scale: float) -> torch.Tensor:
    """fp64 causal attention with the query offset, GQA by head groups: [T, H, D] fp64."""
    q = case.q.double().cpu()
    num_heads = q.shape[1]
    outs = []
    start = 0
    for i, (ctx, n) in enumerate(case.specs):
        k = case.k_full[i].double()  # [L, KVH, D]
        v = case.v_full[i].double()
        group = num_heads // k.shape[1]
        k = k.repeat_interleave(group, dim=1).transpose(0, 1)  # [H, L, D]
        v = v.repeat_interleave(group, dim=1).transpose(0, 1)
        qi = q[start : start + n].transpose(0, 1)  # [H, n, D]
        s = qi @ k.transpose(1, 2) * scale  # [H, n, L]
        pos = ctx + torch.arange(n)
        mask = torch.arange(ctx + n)[None, :] <= pos[:, None]
        s = s.masked_fill(~mask, float("-inf"))
        outs.append((s.softmax(-1) @ v).transpose(0, 1))
        start += n
    return torch.cat(outs)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64, ref64 = out.double().cpu(), ref.double().cpu()
    return float((out64 - ref64).norm() / ref64.norm())


def fp8_cache(
    k_cache: torch.Tensor, v_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """An FP8 cache of the same slots: (K e4m3, V e4m3 page-major, (K scales, V scales)),
    quantized per token and KV head. Slots that hold no key stay NaN in K; in V they hold
    e4m3's largest value instead, since the kernels read V unmasked (kernels.kv_tiles), which
    needs finite bytes, and a kernel that weighs such a slot still cannot pass."""
    (kq, ks), (vq, vs) = quantize_rows(k_cache), quantize_rows(v_cache)
    vq.view(torch.uint8)[torch.isnan(vq.float())] = 0x7E  # 448
    return kq, to_page_major(vq), (ks.contiguous(), vs.contiguous())
