"""FP8 (e4m3) KV cache: the quantizer, the Triton store / decode / prefill kernels against the
torch reference (interpreted on the CPU, compiled on CUDA), and the engine with
``kv_cache_dtype="fp8"`` under prefix caching, chunked prefill, preemption, CUDA graphs and
tensor parallelism.

Attention references are fp64 over the *dequantized* cache, so they check the kernels'
arithmetic exactly as tightly as the unquantized tests do; what quantization itself costs is
measured by ``bench/fp8_accuracy.py``, not here.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

import gpu_engine.kernels  # noqa: F401  (switches the interpreter on without CUDA)
from gpu_engine import LLM, SamplingParams
from gpu_engine.config import ConfigError, EngineConfig
from gpu_engine.fp8 import (
    E4M3_MAX,
    FP8_DTYPE,
    dequantize_rows,
    is_page_major,
    quantize_rows,
    to_page_major,
)
from gpu_engine.kernels.decode_attention import paged_decode_attention
from gpu_engine.kernels.kv_cache import store_kv_cache
from gpu_engine.kernels.prefill_attention import paged_prefill_attention
from gpu_engine.layers.torch_ref import TorchRefBackend, store_kv
from gpu_engine.layers.triton_attn import TritonBackend
from tests.gpu_engine.paged_cases import PagedCase, fp8_cache, make_case, reference, rel_err

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2}
gpu = pytest.mark.gpu


def _seed() -> int:
    return random.randrange(2**31)


def quantize_case(case: PagedCase) -> tuple[PagedCase, tuple[torch.Tensor, torch.Tensor]]:
    """The case with an FP8 cache (``paged_cases.fp8_cache``) and its full K/V replaced by
    what the cache reads back."""
    case.k_cache, case.v_cache, scales = fp8_cache(case.k_cache, case.v_cache)

    def read_back(full: torch.Tensor) -> torch.Tensor:
        q, s = quantize_rows(full.to(case.q.dtype))
        return dequantize_rows(q, s, torch.float32)

    case.k_full = [read_back(t) for t in case.k_full]
    case.v_full = [read_back(t) for t in case.v_full]
    return case, scales


# ---------------------------------------------------------------- quantizer


def test_quantize_rows_scales_each_row_to_the_e4m3_range() -> None:
    x = torch.randn(6, 3, 64) * torch.logspace(-4, 3, 6)[:, None, None]
    x[2, 1] = 0.0  # an all-zero row: scale 1, values 0
    q, scale = quantize_rows(x)
    assert q.dtype == FP8_DTYPE and scale.shape == (6, 3)
    assert scale[2, 1] == 1.0 and (q[2, 1].float() == 0).all()
    top = q.float().abs().amax(-1)
    assert torch.equal(top[scale != 1.0], torch.full_like(top[scale != 1.0], E4M3_MAX))
    back = dequantize_rows(q, scale, torch.float32)
    # e4m3 keeps 3 mantissa bits: relative error ≤ 2^-4 for normal values
    normal = x.abs() >= scale[..., None] * 2**-6
    assert ((back - x).abs() <= x.abs() * 2**-4 + 1e-30)[normal].all()


# ---------------------------------------------------------------- store kernel


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_kv_fp8_matches_the_torch_store_bit_for_bit(dtype: torch.dtype) -> None:
    tokens, kvh, d, blocks, page = 11, 3, 40, 6, 4  # 3 heads, head_dim 40: padded tiles
    gen = torch.Generator().manual_seed(_seed())
    k = (torch.randn(tokens, kvh, d, generator=gen) * 3).to(dtype).to(DEV)
    v = (torch.randn(tokens, kvh, d, generator=gen) / 50).to(dtype).to(DEV)
    k[2, 1] = 0.0
    slots = torch.randperm(blocks * page, generator=gen)[:tokens].to(DEV)
    slots[4] = -1  # padding token: stored nowhere

    def empty() -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        kc = torch.full((blocks, page, kvh, d), float("nan"), device=DEV).to(FP8_DTYPE)
        scales = tuple(torch.full((blocks, page, kvh), float("nan"), device=DEV) for _ in "kv")
        return kc, to_page_major(kc), scales  # type: ignore[return-value]

    kc, vc, sc = empty()
    store_kv_cache(k, v, kc, vc, slots, sc)
    ref_k, ref_v, ref_sc = empty()
    store_kv(k, v, ref_k, ref_v, slots, ref_sc)
    assert is_page_major(vc) and is_page_major(ref_v)  # the same strides: the same bytes
    for got, want in ((kc, ref_k), (vc, ref_v)):
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    for got, want in zip(sc, ref_sc, strict=True):
        assert torch.equal(got.nan_to_num(-1.0), want.nan_to_num(-1.0))
    untouched = torch.ones(blocks * page, dtype=torch.bool)
    untouched[slots[slots >= 0].cpu()] = False
    assert torch.isnan(sc[0].cpu().view(-1, kvh)[untouched]).all()
    assert torch.isnan(kc.cpu().float().view(-1, kvh, d)[untouched]).all()


def test_fp8_cache_without_scales_is_refused() -> None:
    k = torch.randn(2, 1, 16, device=DEV)
    kc = torch.zeros(2, 4, 1, 16, device=DEV).to(FP8_DTYPE)
    with pytest.raises(ValueError, match="scale"):
        store_kv_cache(k, k, kc, to_page_major(kc), torch.tensor([0, 1], device=DEV))
    with pytest.raises(ValueError, match="FP8"):
        paged_decode_attention(
            torch.randn(1, 2, 16, device=DEV), kc, to_page_major(kc), torch.zeros(1, 1,
            dtype=torch.int32, device=DEV), torch.ones(1, dtype=torch.int32, device=DEV), 0.25,
        )  # fmt: skip


def test_a_token_major_fp8_v_cache_is_refused() -> None:
    """The kernels read an FP8 V cache page-major (kernels.kv_tiles); a contiguous one would
    be read as garbage, so every launcher refuses it, naming the layout."""
    k = torch.randn(2, 1, 16, device=DEV)
    kc = torch.zeros(2, 4, 1, 16, device=DEV).to(FP8_DTYPE)
    scales = (torch.zeros(2, 4, 1, device=DEV), torch.zeros(2, 4, 1, device=DEV))
    slots = torch.tensor([0, 1], device=DEV)
    with pytest.raises(ValueError, match="FP8 v_cache must be page-major"):
        store_kv_cache(k, k, kc, kc.clone(), slots, scales)
    store_kv_cache(k, k, kc, to_page_major(kc), slots, scales)  # the layout it takes
    table = torch.zeros(1, 1, dtype=torch.int32, device=DEV)
    one = torch.ones(1, dtype=torch.int32, device=DEV)
    q = torch.randn(1, 2, 16, device=DEV)
    with pytest.raises(ValueError, match="FP8 v_cache must be page-major"):
        paged_decode_attention(q, kc, kc.clone(), table, one, 0.25, kv_scales=scales)
    cu = torch.tensor([0, 1], dtype=torch.int32, device=DEV)
    with pytest.raises(ValueError, match="FP8 v_cache must be page-major"):
        paged_prefill_attention(q, kc, kc.clone(), table, cu, one, 1, 0.25, kv_scales=scales)


# ---------------------------------------------------------------- attention kernels

DECODE_CPU = [
    ([(5, 1), (20, 1), (0, 1)], 4, 2, 32, 4, 0),
    ([(16, 1), (23, 1)], 6, 2, 16, 8, 2),  # GQA 3, prefix sharing, page ≠ tile
]
DECODE_GPU = [
    ([(511, 1)] * 8, 28, 4, 128, 16, 0),
    ([(100, 1), (2000, 1), (4095, 1), (0, 1), (33, 1)], 16, 8, 128, 16, 0),
    ([(63, 1), (64, 1), (65, 1)], 8, 1, 64, 32, 1),
]
PREFILL_CPU = [
    ([(0, 19), (8, 5), (3, 1)], 4, 2, 32, 4, 0),
    ([(8, 3), (12, 20)], 4, 1, 16, 4, 2),
]
PREFILL_GPU = [
    ([(0, 512), (0, 37), (0, 1)], 16, 8, 128, 16, 0),
    ([(256, 100), (384, 300)], 16, 8, 128, 16, 16),
    ([(1000, 64), (5, 700), (0, 129)], 28, 4, 128, 16, 0),
]


def _shrink_v(case: PagedCase, v_size: float) -> PagedCase:
    """The case with every V value times ``v_size`` (cache and reference alike)."""
    if v_size != 1.0:
        case.v_cache.mul_(v_size)
        case.v_full = [t * v_size for t in case.v_full]
    return case


def _decode_check(specs, h, kvh, d, page, shared, dtype, splits, block_n=None, v_size=1.0):
    case = _shrink_v(make_case(specs, h, kvh, d, page, dtype, DEV, shared_blocks=shared,
                               seed=_seed()), v_size)  # fmt: skip
    case, scales = quantize_case(case)
    out = torch.full_like(case.q, float("nan"))
    paged_decode_attention(
        case.q, case.k_cache, case.v_cache, case.meta.block_tables, case.meta.seq_lens,
        d**-0.5, num_splits=splits, out=out, kv_scales=scales, block_n=block_n,
    )  # fmt: skip
    assert torch.isfinite(out).all()
    err = rel_err(out, reference(case, d**-0.5))
    assert err < TOL[dtype], f"rel err {err:.2e} splits={splits}"


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("case", DECODE_CPU)
def test_decode_attention_fp8_small(case, splits: int) -> None:
    _decode_check(*case, torch.float32, splits)


def test_decode_attention_fp8_wide_tiles() -> None:
    # The bf16 default for FP8 caches: 128 keys per tile (here over two splits, pages of 4).
    _decode_check([(150, 1), (7, 1), (0, 1)], 4, 2, 16, 4, 0, torch.float32, 2, block_n=128)


@pytest.mark.parametrize(("value", "want"), [("64", "BLOCK_N 64"), ("100", "CHATQ_FP8_KV_TILE")])
def test_the_fp8_tile_width_knob_is_used_or_refused(value: str, want: str) -> None:
    """CHATQ_FP8_KV_TILE (the A/B of the FP8 decode tile width) reaches the launch of a bf16
    model's FP8 decode; a width the kernels do not take stops the import, naming it."""
    import os
    import subprocess
    import sys

    code = (
        "import torch; from gpu_engine.kernels.decode_attention import launch_constants\n"
        "q = torch.zeros(1, 4, 64, dtype=torch.bfloat16)\n"
        "k = torch.zeros(2, 16, 2, 64, dtype=torch.float8_e4m3fn)\n"
        "c = launch_constants(q, k, (torch.ones(1), torch.ones(1)), 1)\n"
        "print('BLOCK_N', c['BLOCK_N'])\n"
    )
    env = {**os.environ, "CHATQ_FP8_KV_TILE": value}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, check=False)  # fmt: skip
    assert want in out.stdout + out.stderr
    assert (out.returncode == 0) == (value == "64"), out.stderr[-2000:]


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("splits", [1, 4])
@pytest.mark.parametrize("case", DECODE_GPU)
def test_decode_attention_fp8_gpu(case, splits: int, dtype: torch.dtype) -> None:
    _decode_check(*case, dtype, splits)


def _prefill_check(specs, h, kvh, d, page, shared, dtype, v_size=1.0) -> None:
    case = _shrink_v(make_case(specs, h, kvh, d, page, dtype, DEV, shared_blocks=shared,
                               seed=_seed()), v_size)  # fmt: skip
    case, scales = quantize_case(case)
    out = torch.full_like(case.q, float("nan"))
    meta = case.meta
    paged_prefill_attention(
        case.q, case.k_cache, case.v_cache, meta.block_tables, meta.cu_seqlens_q,
        meta.seq_lens, meta.max_query_len, d**-0.5, out=out, kv_scales=scales,
    )  # fmt: skip
    assert torch.isfinite(out).all()
    err = rel_err(out, reference(case, d**-0.5))
    assert err < TOL[dtype], f"rel err {err:.2e}"


@pytest.mark.parametrize("case", PREFILL_CPU)
def test_prefill_attention_fp8_small(case) -> None:
    _prefill_check(*case, torch.float32)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", PREFILL_GPU)
def test_prefill_attention_fp8_gpu(case, dtype: torch.dtype) -> None:
    _prefill_check(*case, dtype)


@gpu
@pytest.mark.skipif(not CUDA, reason="the fp16 dots of FP8 tiles are compiled only")
@pytest.mark.parametrize("kernel", ["decode", "prefill"])
def test_fp8_attention_keeps_tiny_values_gpu(kernel: str) -> None:
    """V entries near 1e-5 (scales ~2e-8): p * v_s alone would fall below fp16's normal
    range in the bf16 model's fp16 dots; relative to the tile's largest scale it does not."""
    if kernel == "decode":
        _decode_check(*DECODE_GPU[1], torch.bfloat16, 1, v_size=1e-5)
    else:
        _prefill_check(*PREFILL_GPU[2], torch.bfloat16, v_size=1e-5)


def _backends_check(specs, h, kvh, d, page, shared, dtype) -> None:
    """Both backends store this step's K/V into copies of one FP8 cache (prefix already
    there), then attend: the same cache bytes, outputs within the kernel tolerance."""
    case = make_case(
        specs, h, kvh, d, page, dtype, DEV, shared_blocks=shared, store_new=False, seed=_seed()
    )
    case, scales = quantize_case(case)
    outs, caches = [], []
    for backend in (TritonBackend(), TorchRefBackend()):
        kc, vc = case.k_cache.clone(), case.v_cache.clone()
        sc = (scales[0].clone(), scales[1].clone())
        outs.append(backend.forward(case.q, case.k_new, case.v_new, kc, vc, case.meta, 0.2, sc))
        caches.append((kc.view(torch.uint8), vc.view(torch.uint8), *sc))
    names = ("k cache bytes", "v cache bytes", "k scales", "v scales")
    for name, got, want in zip(names, *caches, strict=True):
        differ = (got.nan_to_num(-1) != want.nan_to_num(-1)).nonzero()
        first = [tuple(i) for i in differ[:4].tolist()]
        assert not len(differ), (
            f"{name}: {len(differ)} differ (Triton vs torch), first at {first}: "
            f"{[got[i].item() for i in first]} vs {[want[i].item() for i in first]}"
        )
    assert torch.isfinite(outs[0]).all()
    assert rel_err(outs[0], outs[1]) < TOL[dtype]


def test_triton_backend_fp8_matches_torch_reference_small() -> None:
    _backends_check([(8, 6), (8, 9), (4, 1), (13, 1), (1, 1)], 4, 2, 16, 4, 2, torch.float32)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_backend_fp8_matches_torch_reference_gpu(dtype: torch.dtype) -> None:
    specs = [(256, 200), (256, 1000), (0, 77), (900, 1), (3000, 1), (1, 1)]
    _backends_check(specs, 16, 8, 128, 16, 16, dtype)


# ---------------------------------------------------------------- engine

MAX_TOKENS = 10
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)


def _prompts(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(3, 500) for _ in range(24)]
    mixed = [[rng.randrange(3, 500) for _ in range(n)] for n in (1, 5, 19, 45)]
    return mixed + [shared + [rng.randrange(3, 500) for _ in range(n)] for n in (1, 6, 11)]


def test_fp8_kv_engine_under_chunking_prefix_hits_and_preemption(tiny_checkpoint: Any) -> None:
    """The tokens of an FP8-KV engine do not depend on how the work was scheduled: chunked
    prefill, prefix-cache hits and preemption (recompute) give the all-at-once tokens; the
    cache holds (D + 4) / (2 D) of the bytes per token."""
    path = tiny_checkpoint("qwen3")
    prompts = _prompts(seed=11)
    base = dict(device="cpu", kv_cache_dtype="fp8")
    scenarios: dict[str, dict[str, Any]] = {
        "together": dict(kv_cache_tokens=2048, enable_prefix_caching=False),
        "chunked": dict(kv_cache_tokens=2048, block_size=8, max_num_batched_tokens=8),
        "preempt": dict(kv_cache_tokens=96, block_size=8, admission_watermark=0.0),
    }
    results = {}
    for name, options in scenarios.items():
        llm = LLM(str(path), **base, **options)
        results[name] = [o.token_ids for o in llm.generate(prompts, GREEDY)]
        stats = llm.engine.stats()
        if name == "chunked":
            assert stats["prefix_cache_hit_tokens"] > 0
        if name == "preempt":
            assert stats["preemptions"] > 0
        runner = llm.engine.model_runner
        assert runner.kv_cache.dtype == FP8_DTYPE and runner.kv_scales is not None
    assert results["chunked"] == results["together"]
    assert results["preempt"] == results["together"]
    plain = LLM(str(path), device="cpu", kv_cache_tokens=64).engine.model_runner
    d = plain.arch.head_dim  # fp32 model on the CPU: 4 bytes per element unquantized
    assert runner.kv_bytes_per_token * 4 * d == plain.kv_bytes_per_token * (d + 4)


def test_fp8_kv_through_triton_kernels_matches_torch_reference(tiny_checkpoint: Any) -> None:
    """The engine's FP8-KV tokens with the Triton backend (interpreted without CUDA, mixed
    prefill and decode steps, a prefix hit) equal the torch reference backend's."""
    from tests.gpu_engine.test_kernels import _use_triton_backend

    path = tiny_checkpoint("qwen3")
    prompts = _prompts(seed=5)[2:6]
    kw = dict(
        device=DEV, dtype="float32", kv_cache_tokens=512, block_size=8, kv_cache_dtype="fp8",
        enforce_eager=True, attention_backend="torch", max_num_batched_tokens=32,
    )  # fmt: skip
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    want = [o.token_ids for o in LLM(str(path), **kw).generate(prompts, params)]
    llm = LLM(str(path), **kw)
    _use_triton_backend(llm.engine.model_runner)
    assert [o.token_ids for o in llm.generate(prompts, params)] == want


def test_fp8_kv_options_are_validated(tiny_checkpoint: Any) -> None:
    with pytest.raises(ConfigError, match="kv_cache_dtype"):
        EngineConfig(model="m", kv_cache_dtype="int4")
    with pytest.raises(ConfigError, match="flash_attn"):
        EngineConfig(model="m", kv_cache_dtype="fp8", attention_backend="flash_attn")
    assert EngineConfig(model="m", kv_cache_dtype="fp8_e4m3").fp8_kv_cache


@gpu
@pytest.mark.skipif(not CUDA, reason="CUDA graphs")
def test_fp8_kv_cuda_graphs_match_eager(tiny_checkpoint: Any) -> None:
    """Decode and mixed-step CUDA graphs with an FP8 cache give the eager tokens (fp32
    model: the graphs' split counts differ from eager ones, which bf16 rounding would show)."""
    path = tiny_checkpoint("qwen2")
    prompts = _prompts(seed=2)
    kw = dict(
        dtype="float32", kv_cache_tokens=4096, block_size=16, kv_cache_dtype="fp8",
        max_num_seqs=8, max_num_batched_tokens=64,
    )  # fmt: skip
    eager_llm = LLM(str(path), enforce_eager=True, **kw)
    eager = [o.token_ids for o in eager_llm.generate(prompts, GREEDY)]
    llm = LLM(str(path), **kw)
    got = [o.token_ids for o in llm.generate(prompts, GREEDY)]
    runner = llm.engine.model_runner
    assert runner.graphs is not None and runner.graphs.num_replays > 0
    assert got == eager


@pytest.mark.timeout(180)
def test_fp8_kv_with_tensor_parallelism_matches_one_rank(tiny_checkpoint: Any) -> None:
    """TP=2 with an FP8 cache (each rank quantizes its own KV heads; gloo on the CPU) gives
    TP=1's FP8 tokens, under chunked prefill and prefix hits."""
    path = str(tiny_checkpoint("llama"))
    prompts = _prompts(seed=4)
    kw = dict(kv_cache_tokens=1024, block_size=8, max_num_batched_tokens=16, kv_cache_dtype="fp8")
    kw["device"] = "cpu"  # gloo ranks on the CPU, also on a machine with one GPU
    want = [o.token_ids for o in LLM(path, **kw).generate(prompts, GREEDY)]
    with LLM(path, tensor_parallel_size=2, **kw) as two:
        runner = two.engine.model_runner
        assert runner.kv_cache.dtype == FP8_DTYPE and runner.kv_cache.shape[-2] == 1
        assert [o.token_ids for o in two.generate(prompts, GREEDY)] == want
