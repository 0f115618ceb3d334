"""Model runner: logits parity with transformers (prefill, batched decode, chunked prefill,
prefix hits), the torch reference attention on a paged cache, loading and KV sizing."""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from gpu_engine import LLMEngine
from gpu_engine.layers.base import AttentionMetadata
from gpu_engine.layers.torch_ref import TorchRefBackend
from tests.gpu_engine.conftest import hf_model

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}
ARCHS: list[tuple[str, dict[str, Any]]] = [
    ("llama", {}),
    ("qwen2", {}),
    ("qwen3", {}),
    ("llama", {"rope_scaling": LLAMA3_ROPE}),
]
ARCH_IDS = ["llama", "qwen2", "qwen3", "llama-rope-llama3"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def hf_last_logits(path: Path, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(path)(torch.tensor([ids])).logits[0, -1]


def first_two_logits(engine: LLMEngine, prompts: dict[str, list[int]]) -> dict[str, Any]:
    """Drive the engine by hand; per request, the logits of its first two sampled tokens and
    the greedy tokens chosen."""
    for rid, prompt in prompts.items():
        engine.add_request(rid, prompt)
    seen: dict[str, list[tuple[torch.Tensor, int]]] = {rid: [] for rid in prompts}
    while any(len(v) < 2 for v in seen.values()):
        batch = engine.scheduler.schedule(time.time())
        logits, rows = engine.model_runner.forward_logits(batch)
        sampled: list[int | None] = [None] * len(batch.seqs)
        for r, i in enumerate(rows):
            token = int(logits[r].argmax())
            sampled[i] = token
            seen[batch.seqs[i].request_id].append((logits[r], token))
        engine.scheduler.postprocess(batch, sampled)
    for rid in prompts:
        engine.abort(rid)
    engine.step()
    return seen


@pytest.mark.parametrize(("arch", "overrides"), ARCHS, ids=ARCH_IDS)
def test_logits_match_transformers(tiny_checkpoint: Any, arch: str, overrides: Any) -> None:
    path = tiny_checkpoint(arch, **overrides)
    rng = random.Random(1)
    prompts = {f"p{n}": [rng.randrange(3, 500) for _ in range(n)] for n in (1, 7, 40)}
    # Budget 16 chunks the 40-token prompt; block size 8 gives multi-block tables.
    engine = LLMEngine.from_options(
        str(path), kv_cache_tokens=512, block_size=8, max_num_batched_tokens=16
    )
    seen = first_two_logits(engine, prompts)
    for rid, prompt in prompts.items():
        (first, tok), (second, _) = seen[rid][:2]
        assert rel_err(first, hf_last_logits(path, prompt)) < 1e-4, rid
        assert rel_err(second, hf_last_logits(path, [*prompt, tok])) < 1e-4, rid
    # Prefix-cache hits: the same prompts again reuse the computed blocks.
    hits_before = engine.block_manager.prefix_hit_tokens
    again = first_two_logits(engine, {f"again-{k}": v for k, v in prompts.items()})
    assert engine.block_manager.prefix_hit_tokens > hits_before
    for rid, prompt in prompts.items():
        first = again[f"again-{rid}"][0][0]
        assert rel_err(first, hf_last_logits(path, prompt)) < 1e-4


def test_sharded_checkpoint_loads(tiny_checkpoint: Any, tmp_path: Path) -> None:
    src = tiny_checkpoint("llama")
    hf_model(src).save_pretrained(str(tmp_path), max_shard_size="60KB")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, tmp_path / name)
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    engine = LLMEngine.from_options(str(tmp_path), kv_cache_tokens=256)
    seen = first_two_logits(engine, {"a": [5, 6, 7, 8, 9]})
    assert rel_err(seen["a"][0][0], hf_last_logits(src, [5, 6, 7, 8, 9])) < 1e-4


def test_tied_embeddings_share_storage(tiny_checkpoint: Any) -> None:
    engine = LLMEngine.from_options(str(tiny_checkpoint("qwen2")), kv_cache_tokens=64)
    model = engine.model_runner.model
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    untied = LLMEngine.from_options(str(tiny_checkpoint("llama")), kv_cache_tokens=64)
    m2 = untied.model_runner.model
    assert m2.lm_head.weight.data_ptr() != m2.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_runs_close_to_fp32(tiny_checkpoint: Any, dtype: str) -> None:
    path = tiny_checkpoint("qwen3")
    engine = LLMEngine.from_options(str(path), dtype=dtype, kv_cache_tokens=128)
    assert engine.model_runner.kv_cache.dtype == getattr(torch, dtype)
    seen = first_two_logits(engine, {"a": [5, 6, 7, 8, 9, 10]})
    assert rel_err(seen["a"][0][0], hf_last_logits(path, [5, 6, 7, 8, 9, 10])) < 5e-2


def test_kv_cache_sizing(tiny_checkpoint: Any) -> None:
    path = str(tiny_checkpoint("llama"))
    explicit = LLMEngine.from_options(path, kv_cache_tokens=100, block_size=16)
    assert explicit.model_runner.num_kv_blocks == 6
    assert explicit.capacity().total_kv_tokens == 96
    # max_model_len never exceeds what the cache holds, so a lone request always fits.
    assert explicit.max_model_len == 96
    auto = LLMEngine.from_options(path, cpu_kv_cache_max_tokens=4096)
    assert auto.capacity().total_kv_tokens == 4096


def _naive_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, query_len: int, scale: float
) -> torch.Tensor:
    """Dense causal attention in fp64 for one sequence; q [Q,H,D], k/v [L,KVH,D]."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1).double(), v.repeat_interleave(groups, 1).double()
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    length = k.shape[0]
    pos = torch.arange(length - query_len, length)
    scores = scores.masked_fill(torch.arange(length)[None, :] > pos[:, None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", F.softmax(scores, -1), v)


def test_torch_reference_backend_on_paged_cache() -> None:
    """Chunked prefill with a cached prefix, a fresh prefill and decodes, blocks scattered
    and shared, every unused cache slot NaN: output equals dense causal attention."""
    gen = torch.Generator().manual_seed(0)
    heads, kv_heads, dim, page, num_blocks = 4, 2, 8, 4, 32
    # (context already cached, new tokens): chunk after a prefix, fresh prefill, decodes.
    specs = [(9, 5), (0, 6), (12, 1), (5, 1)]
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    k_cache = torch.full((num_blocks, page, kv_heads, dim), float("nan"))
    v_cache = torch.full_like(k_cache, float("nan"))
    tables, full_k, full_v, qs, ks, vs, slots = [], [], [], [], [], [], []
    for i, (ctx, new) in enumerate(specs):
        length = ctx + new
        table = [perm.pop() for _ in range(-(-length // page))]
        if i == 3:
            table[0] = tables[0][0]  # shares its first (full, cached) block with sequence 0
        tables.append(table)
        kf = torch.randn(length, kv_heads, dim, generator=gen)
        vf = torch.randn(length, kv_heads, dim, generator=gen)
        if i == 3:
            kf[:page], vf[:page] = full_k[0][:page], full_v[0][:page]
        full_k.append(kf)
        full_v.append(vf)
        for p in range(length):
            slot = (table[p // page], p % page)
            if p < ctx:
                k_cache[slot], v_cache[slot] = kf[p], vf[p]
            else:
                slots.append(table[p // page] * page + p % page)
        qs.append(torch.randn(new, heads, dim, generator=gen))
        ks.append(kf[ctx:])
        vs.append(vf[ctx:])
    width = max(len(t) for t in tables)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots),
        cu_seqlens_q=torch.tensor([0, 5, 11, 12, 13], dtype=torch.int32),
        seq_lens=torch.tensor([c + n for c, n in specs], dtype=torch.int32),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables]).int(),
        max_query_len=6,
        max_seq_len=14,
        num_prefill_seqs=2,
        num_decode_seqs=2,
        query_lens_host=[n for _, n in specs],
        seq_lens_host=[c + n for c, n in specs],
    )
    out = TorchRefBackend().forward(
        torch.cat(qs), torch.cat(ks), torch.cat(vs), k_cache, v_cache, meta, dim**-0.5
    )
    start = 0
    for i, (_, new) in enumerate(specs):
        want = _naive_attention(qs[i], full_k[i], full_v[i], new, dim**-0.5)
        torch.testing.assert_close(out[start : start + new].double(), want, atol=1e-5, rtol=1e-5)
        start += new
