"""Shared-prefix attention: the grouping (numpy), the prefix kernel + suffix decode + log-sum-
exp merge against an fp64 reference (interpreted on the CPU, compiled on CUDA; bf16 and FP8
caches on the GPU), and the engine's staged decode path with sharing on (same tokens)."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest
import torch

import gpu_engine.kernels  # noqa: F401  (switches the interpreter on without CUDA)
from gpu_engine.fp8 import dequantize_rows
from gpu_engine.kernels.decode_attention import paged_decode_attention
from gpu_engine.kernels.shared_prefix import choose_prefix_splits
from gpu_engine.layers.base import SharedPrefix
from gpu_engine.prefix_groups import find_prefix_groups, max_prefix_tiles, prefix_block_s
from tests.gpu_engine.paged_cases import fp8_cache

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
gpu = pytest.mark.gpu


# ---------------------------------------------------------------- grouping


def test_groups_form_from_shared_leading_blocks() -> None:
    bs = 4
    tables = np.zeros((8, 6), dtype=np.int32)
    tables[0] = [1, 2, 3, 4, 10, 11]
    tables[1] = [1, 2, 3, 4, 20, 21]
    tables[2] = [1, 2, 3, 30, 0, 0]  # shares 3 blocks: the group's prefix becomes 3
    tables[3] = [1, 40, 41, 0, 0, 0]  # shares 1 of 4: a straggler, attends alone
    tables[4] = [5, 6, 7, 0, 0, 0]  # shares nothing
    tables[5] = [8, 9, 0, 0, 0, 0]  # second group ...
    tables[6] = [8, 9, 0, 0, 0, 0]  # ... whose prefix must end before the current token
    rows = np.array([0, 1, 2, 3, 4, 5, 6])
    positions = np.array([22, 21, 14, 12, 10, 7, 5])
    groups = find_prefix_groups(tables, rows, positions, bs, block_s=2)
    assert groups is not None
    assert groups.kv_start.tolist() == [12, 12, 12, 0, 0, 4, 4]
    assert [b.tolist() for b in groups.group_blocks] == [[1, 2, 3], [8]]
    assert groups.tile_group.tolist() == [0, 0, 1]
    assert groups.tile_members.tolist() == [[0, 1], [2, -1], [5, 6]]
    assert groups.shared_tokens == 2 * 12 + 4
    assert len(groups.tile_group) <= max_prefix_tiles(7, 2)
    # Sharing only the block that holds the current token: nothing to share yet.
    assert find_prefix_groups(tables, rows[5:], np.array([3, 3]), bs, 2) is None
    assert find_prefix_groups(tables, rows[3:5], positions[3:5], bs, 2) is None
    one = find_prefix_groups(tables, rows, positions, bs, block_s=4, max_groups=1)
    assert one is not None and len(one.group_blocks) == 1 and one.kv_start[5] == 0


# ---------------------------------------------------------------- kernels


def _case(
    num_seqs: int, groups: list[tuple[list[int], int]], h: int, kvh: int, d: int, page: int,
    dtype: torch.dtype, fp8: bool, seed: int,
) -> dict[str, Any]:  # fmt: skip
    """``num_seqs`` decode sequences with random lengths; each (members, prefix blocks) group
    shares its first blocks physically. Unused cache slots are NaN."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    lens = [rng.randint(1, 6 * page) for _ in range(num_seqs)]
    for members, nb in groups:
        for m in members:
            lens[m] = nb * page + rng.randint(1, 3 * page)
    lens[-1] = 0  # a padding row (as in a CUDA graph): output zeros
    pool = iter(torch.randperm(sum(-(-x // page) for x in lens) + 4, generator=gen).tolist())
    tables = [[next(pool) for _ in range(-(-x // page))] for x in lens]
    for members, nb in groups:
        for m in members[1:]:
            tables[m][:nb] = tables[members[0]][:nb]
    nblocks = max(max(t, default=0) for t in tables) + 5
    kc = torch.full((nblocks, page, kvh, d), float("nan"))
    vc = torch.full_like(kc, float("nan"))
    for t in tables:
        for b in t:
            kc[b] = torch.randn(page, kvh, d, generator=gen)
            vc[b] = torch.randn(page, kvh, d, generator=gen)
    kc, vc = kc.to(dtype), vc.to(dtype)
    scales = None
    if fp8:
        kc, vc, (ks, vs) = fp8_cache(kc, vc)
        scales = (ks.to(DEV), vs.to(DEV))
        k_read, v_read = (
            dequantize_rows(kc, ks, torch.float64),
            dequantize_rows(vc, vs, torch.float64),
        )
    else:
        k_read, v_read = kc.double(), vc.double()
    bt = torch.zeros(num_seqs, max(len(t) for t in tables), dtype=torch.int32)
    for i, t in enumerate(tables):
        bt[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
    q = torch.randn(num_seqs, h, d, generator=gen).to(dtype)
    ref = torch.zeros(num_seqs, h, d, dtype=torch.float64)
    for i, n in enumerate(lens):
        if n == 0:
            continue
        k = k_read[bt[i, : -(-n // page)].long()].reshape(-1, kvh, d)[:n]
        v = v_read[bt[i, : -(-n // page)].long()].reshape(-1, kvh, d)[:n]
        k, v = k.repeat_interleave(h // kvh, 1), v.repeat_interleave(h // kvh, 1)
        s = torch.einsum("hd,nhd->hn", q[i].double(), k) * d**-0.5
        ref[i] = torch.einsum("hn,nhd->hd", s.softmax(-1), v)
    return dict(q=q.to(DEV), kc=kc.to(DEV), vc=vc.to(DEV), bt=bt.to(DEV), scales=scales,
                lens=torch.tensor(lens, dtype=torch.int32, device=DEV), ref=ref, tables=bt,
                positions=np.array(lens) - 1)  # fmt: skip


def _shared_from_groups(c: dict[str, Any], page: int, block_s: int) -> SharedPrefix:
    """Find the groups as the engine does, then lay them out at fixed capacities."""
    n = c["tables"].shape[0]
    groups = find_prefix_groups(c["tables"].numpy(), np.arange(n), c["positions"], page, block_s)
    assert groups is not None
    cap = max_prefix_tiles(n, block_s)
    tile_group = np.full(cap, -1, np.int32)
    tile_members = np.full((cap, block_s), -1, np.int32)
    t = len(groups.tile_group)
    tile_group[:t], tile_members[:t] = groups.tile_group, groups.tile_members
    width = c["tables"].shape[1]
    tables = np.zeros((4, width), np.int32)
    lens = np.zeros(4, np.int32)
    for g, blocks in enumerate(groups.group_blocks):
        tables[g, : len(blocks)] = blocks
        lens[g] = len(blocks) * page

    def dev(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).to(DEV)

    return SharedPrefix(
        kv_start=dev(groups.kv_start), tile_group=dev(tile_group),
        tile_members=dev(tile_members), group_tables=dev(tables), group_lens=dev(lens),
    )  # fmt: skip


def _check(n, groups, h, kvh, d, page, dtype, fp8, splits, tol, prefix_splits=None) -> None:
    c = _case(n, groups, h, kvh, d, page, dtype, fp8, random.randrange(2**31))
    shared = _shared_from_groups(c, page, prefix_block_s(h // kvh))
    assert int((shared.kv_start > 0).sum()) >= 2
    out = torch.full_like(c["q"], float("nan"))
    paged_decode_attention(
        c["q"], c["kc"], c["vc"], c["bt"], c["lens"], d**-0.5, num_splits=splits, out=out,
        kv_scales=c["scales"], shared=shared, prefix_splits=prefix_splits,
    )  # fmt: skip
    assert torch.isfinite(out).all()
    assert torch.equal(out[-1].cpu(), torch.zeros_like(out[-1].cpu()))
    err = float((out.double().cpu() - c["ref"]).norm() / c["ref"].norm())
    assert err < tol, f"rel err {err:.2e}"


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("fp8", [False, True])
def test_shared_prefix_decode_small(splits: int, fp8: bool) -> None:
    # GQA 3 (padded to 4: 16 members per tile), two groups, loners, a padding row.
    _check(9, [([0, 2, 3, 5], 2), ([6, 7], 1)], 6, 2, 16, 4, torch.float32, fp8, splits, 1e-4)


@pytest.mark.parametrize("prefix_splits", [2, 3])
@pytest.mark.parametrize("splits", [1, 2])
def test_a_prefix_split_between_programs_merges_to_the_same_attention(
    prefix_splits: int, splits: int
) -> None:
    # Prefixes of 40 and 24 tokens in 32-key tiles (fp32): 2 and 1 tiles, so a split walks
    # one tile or none (an empty split's partial must weigh nothing in the merge). One
    # split: the decode program folds the partials in; two: the merge kernel does.
    _check(9, [([0, 2, 3, 5], 10), ([6, 7], 6)], 6, 2, 16, 4, torch.float32, True, splits,
           1e-4, prefix_splits)  # fmt: skip


def test_a_prefix_split_count_below_one_is_refused() -> None:
    c = _case(4, [([0, 1], 2)], 4, 2, 16, 4, torch.float32, False, 0)
    shared = _shared_from_groups(c, 4, prefix_block_s(2))
    with pytest.raises(ValueError, match="prefix_splits must be >= 1"):
        paged_decode_attention(c["q"], c["kc"], c["vc"], c["bt"], c["lens"], 0.25,
                               shared=shared, prefix_splits=0)  # fmt: skip


def test_prefix_splits_fill_two_waves_of_the_sms() -> None:
    assert choose_prefix_splits(36, 2, 132) == 4  # 256 rows of GQA 6: 72 programs
    assert choose_prefix_splits(8, 2, 132) == 8  # capped
    assert choose_prefix_splits(200, 8, 132) == 1


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("splits", [1, 4])
@pytest.mark.parametrize("prefix_splits", [1, 4])
def test_shared_prefix_decode_gpu(
    dtype: torch.dtype, fp8: bool, splits: int, prefix_splits: int
) -> None:
    # Qwen2.5-1.5B heads (12 / 2): 8 members per tile; a 100-member group over 3 tiles+.
    members = list(range(0, 200, 2))
    _check(203, [(members, 62), ([1, 3, 5], 5)], 12, 2, 128, 16, dtype, fp8, splits,
           1e-4 if dtype == torch.float32 else 1e-2, prefix_splits)  # fmt: skip


# ---------------------------------------------------------------- engine


@pytest.mark.parametrize("kv", ["auto", "fp8"])
def test_staged_decode_with_shared_prefixes_matches_eager(tiny_checkpoint: Any, kv: str) -> None:
    """Chats sharing a 3-block system prompt (and loners) through the staged decode path:
    steps where groups form replay the shared-prefix graphs, the others the plain ones, and
    the tokens equal the eager engine's. Without CUDA the 'graphs' run the same forward on
    the static buffers with interpreted kernels; on CUDA the captured graphs replay."""
    from gpu_engine import LLM, SamplingParams
    from gpu_engine.context import forward_context
    from gpu_engine.cuda_graphs import DecodeGraphs
    from tests.gpu_engine.test_kernels import _use_triton_backend

    path = tiny_checkpoint("qwen3")  # 4 heads / 2 KV heads: GQA 2, 32 members per tile
    system = list(range(5, 29))  # 24 tokens = 3 blocks of 8
    prompts = [[*system, 30 + i, 31] for i in range(4)] + [[12, 13, 14], [40] * 20]
    params = [
        SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in (6, 9, 4, 7, 5, 3)
    ]
    kw = dict(
        device=DEV, dtype="float32", kv_cache_tokens=1024, max_num_seqs=8, block_size=8,
        kv_cache_dtype=kv, attention_backend="triton" if CUDA else "torch",
        shared_prefix_attention=True,
    )  # fmt: skip
    eager = [
        o.token_ids for o in LLM(str(path), enforce_eager=True, **kw).generate(prompts, params)
    ]
    llm = LLM(str(path), **kw)
    runner = llm.engine.model_runner
    if not CUDA:
        _use_triton_backend(runner)
        graphs = DecodeGraphs(
            runner.model, 8, runner.max_model_len, runner.block_size, runner.arch.hidden_size,
            runner.dtype, runner.device, last_tokens=runner.last_tokens, shared_prefix_group=2,
        )  # fmt: skip

        class EagerReplay:
            def __init__(self, bs: int, shared: bool) -> None:
                self.bs, self.shared = bs, shared

            def replay(self) -> None:
                with forward_context(graphs._meta(self.bs, shared=self.shared)):
                    graphs._forward(self.bs)

        graphs.graphs = {bs: EagerReplay(bs, False) for bs in graphs.batch_sizes}  # type: ignore[misc]
        graphs.shared_graphs = {bs: EagerReplay(bs, True) for bs in graphs.batch_sizes if bs > 1}  # type: ignore[misc]
        runner.graphs = graphs
    staged = [o.token_ids for o in llm.generate(prompts, params)]
    graphs = runner.graphs
    assert graphs is not None and graphs.sharing is not None
    assert graphs.sharing.num_staged >= 3 and graphs.sharing.shared_tokens > 0
    assert graphs.num_replays > graphs.sharing.num_staged  # plain steps too
    assert staged == eager


def test_shared_prefix_attention_is_opt_in() -> None:
    from gpu_engine.config import EngineConfig

    assert EngineConfig(model="m").shared_prefix_attention is False
    assert EngineConfig(model="m", shared_prefix_attention=True).shared_prefix_attention
