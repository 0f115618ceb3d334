"""Triton kernels against fp64 references on random inputs (seeded per test and printed by
tests/gpu_engine/conftest.py; ``CHATQ_TEST_SEED=N`` reruns with another seed).

On a CUDA machine every case runs compiled (the ``gpu`` cases add larger shapes and bf16).
On a machine without CUDA, ``gpu_engine.kernels`` switches Triton's interpreter on, and the
small unmarked cases run the same kernels on CPU tensors: slow per element, so their shapes
are tiny, but the indexing, masking, paging and online-softmax logic is the same code.
Outputs are poisoned (NaN) before each run; unused cache slots are NaN too.
"""

from __future__ import annotations

import pytest
import torch

import gpu_engine.kernels  # noqa: F401  (switches the interpreter on without CUDA)
from gpu_engine.kernels.activation import silu_and_mul
from gpu_engine.kernels.decode_attention import paged_decode_attention
from gpu_engine.kernels.kv_cache import store_kv_cache
from gpu_engine.kernels.norm import rms_norm
from gpu_engine.kernels.prefill_attention import paged_prefill_attention
from gpu_engine.kernels.rotary import apply_rotary
from gpu_engine.layers.triton_attn import TritonBackend
from tests.gpu_engine.paged_cases import make_case, reference, rel_err

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 5e-3}
gpu = pytest.mark.gpu

torch.set_num_threads(2)


def _fresh_seed() -> int:
    """A case seed from torch's global generator (seeded per test by the conftest)."""
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


# ---------------------------------------------------------------- KV store


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_kv_cache_writes_exactly_the_mapped_slots(dtype: torch.dtype) -> None:
    tokens, kvh, d, blocks, page = 9, 2, 32, 6, 4
    k = torch.randn(tokens, kvh, d, device=DEV).to(dtype)
    v = torch.randn(tokens, kvh, d, device=DEV).to(dtype)
    slots = torch.randperm(blocks * page, device=DEV)[:tokens]
    slots[3] = -1  # padding token: must not be stored anywhere
    k_cache = torch.full((blocks, page, kvh, d), float("nan"), device=DEV, dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    store_kv_cache(k, v, k_cache, v_cache, slots)
    flat_k, flat_v = k_cache.view(-1, kvh, d), v_cache.view(-1, kvh, d)
    valid = slots >= 0
    assert torch.equal(flat_k[slots[valid]], k[valid])
    assert torch.equal(flat_v[slots[valid]], v[valid])
    untouched = torch.ones(blocks * page, dtype=torch.bool, device=DEV)
    untouched[slots[valid]] = False
    assert torch.isnan(flat_k[untouched]).all() and torch.isnan(flat_v[untouched]).all()


def test_store_kv_cache_takes_strided_views_of_a_fused_qkv() -> None:
    tokens, h, kvh, d = 5, 4, 2, 16
    qkv = torch.randn(tokens, (h + 2 * kvh) * d, device=DEV)
    _, k, v = qkv.split([h * d, kvh * d, kvh * d], dim=-1)
    k, v = k.view(tokens, kvh, d), v.view(tokens, kvh, d)
    k_cache = torch.full((2, 4, kvh, d), float("nan"), device=DEV)
    v_cache = torch.full_like(k_cache, float("nan"))
    slots = torch.tensor([7, 0, 3, 5, 1], device=DEV)
    store_kv_cache(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache.view(-1, kvh, d)[slots], k)
    assert torch.equal(v_cache.view(-1, kvh, d)[slots], v)


# ---------------------------------------------------------------- attention

# (specs, heads, kv_heads, head_dim, page, shared_blocks)
DECODE_CPU = [
    ([(5, 1), (20, 1), (0, 1)], 4, 2, 32, 4, 0),
    ([(16, 1), (23, 1)], 6, 2, 16, 8, 2),  # GQA 3, prefix sharing, page ≠ tile
]
DECODE_GPU = [
    ([(511, 1)] * 8, 28, 4, 128, 16, 0),  # Qwen2.5-7B heads, context 512
    ([(100, 1), (2000, 1), (4095, 1), (0, 1), (33, 1)], 16, 8, 128, 16, 0),
    ([(300, 1), (700, 1)], 16, 8, 128, 256, 1),  # flash-attn page size, shared block
    ([(63, 1), (64, 1), (65, 1)], 8, 1, 64, 32, 1),  # MQA, tile edges
    ([(1000, 1)] * 3, 32, 8, 128, 16, 0),
]


def _decode_check(specs, h, kvh, d, page, shared, dtype, splits) -> None:
    case = make_case(specs, h, kvh, d, page, dtype, DEV, shared_blocks=shared, seed=_fresh_seed())
    scale = d**-0.5
    out = torch.full_like(case.q, float("nan"))
    paged_decode_attention(
        case.q, case.k_cache, case.v_cache, case.meta.block_tables, case.meta.seq_lens,
        scale, num_splits=splits, out=out,
    )  # fmt: skip
    assert torch.isfinite(out).all()
    err = rel_err(out, reference(case, scale))
    assert err < TOL[dtype], f"rel err {err:.2e} splits={splits}"


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("case", DECODE_CPU)
def test_decode_attention_small(case, splits: int) -> None:
    _decode_check(*case, torch.float32, splits)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("splits", [1, 2, 7, 16])
@pytest.mark.parametrize("case", DECODE_GPU)
def test_decode_attention_gpu(case, splits: int, dtype: torch.dtype) -> None:
    _decode_check(*case, dtype, splits)


def test_decode_attention_zero_length_rows_are_zero() -> None:
    # CUDA-graph padding rows have seq_len 0: they must come out as zeros, never NaN.
    for splits in (1, 2):
        case = make_case([(7, 1), (9, 1)], 4, 2, 16, 4, torch.float32, DEV, seed=_fresh_seed())
        seq_lens = case.meta.seq_lens.clone()
        seq_lens[1] = 0
        out = torch.full_like(case.q, float("nan"))
        paged_decode_attention(
            case.q, case.k_cache, case.v_cache, case.meta.block_tables, seq_lens, 0.25,
            num_splits=splits, out=out,
        )  # fmt: skip
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        assert rel_err(out[:1], reference(case, 0.25)[:1]) < 1e-4


# (specs, heads, kv_heads, head_dim, page, shared_blocks): prefill, prefix hits, chunks
PREFILL_CPU = [
    ([(0, 19), (8, 5), (3, 1)], 4, 2, 32, 4, 0),
    ([(8, 3), (12, 20)], 4, 1, 16, 4, 2),  # shared prefix blocks, one 16-row tile + more
]
PREFILL_GPU = [
    ([(0, 512), (0, 37), (0, 1)], 16, 8, 128, 16, 0),
    ([(256, 100), (384, 300)], 16, 8, 128, 16, 16),  # long shared prefix + chunk
    ([(1000, 64), (5, 700), (0, 129)], 28, 4, 128, 16, 0),
    ([(512, 256), (512, 1)], 16, 8, 128, 256, 2),
    ([(17, 33), (0, 2048)], 8, 8, 64, 32, 0),
]


def _prefill_check(specs, h, kvh, d, page, shared, dtype) -> None:
    case = make_case(specs, h, kvh, d, page, dtype, DEV, shared_blocks=shared, seed=_fresh_seed())
    scale = d**-0.5
    out = torch.full_like(case.q, float("nan"))
    meta = case.meta
    paged_prefill_attention(
        case.q, case.k_cache, case.v_cache, meta.block_tables, meta.cu_seqlens_q,
        meta.seq_lens, meta.max_query_len, scale, out=out,
    )  # fmt: skip
    assert torch.isfinite(out).all()
    err = rel_err(out, reference(case, scale))
    assert err < TOL[dtype], f"rel err {err:.2e}"


@pytest.mark.parametrize("case", PREFILL_CPU)
def test_prefill_attention_small(case) -> None:
    _prefill_check(*case, torch.float32)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", PREFILL_GPU)
def test_prefill_attention_gpu(case, dtype: torch.dtype) -> None:
    _prefill_check(*case, dtype)


def _backend_check(specs, h, kvh, d, page, shared, dtype) -> None:
    # The backend stores this step's K/V itself: the cache starts with the prefix only.
    case = make_case(
        specs, h, kvh, d, page, dtype, DEV, shared_blocks=shared, store_new=False,
        seed=_fresh_seed(),
    )  # fmt: skip
    scale = d**-0.5
    out = TritonBackend().forward(
        case.q, case.k_new, case.v_new, case.k_cache, case.v_cache, case.meta, scale
    )
    assert torch.isfinite(out).all()
    err = rel_err(out, reference(case, scale))
    assert err < TOL[dtype], f"rel err {err:.2e}"


def test_triton_backend_mixed_step_small() -> None:
    # Two prefills (one with a shared cached prefix) followed by three decodes.
    _backend_check([(8, 6), (8, 9), (4, 1), (13, 1), (1, 1)], 4, 2, 16, 4, 2, torch.float32)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_backend_mixed_step_gpu(dtype: torch.dtype) -> None:
    specs = [(256, 200), (256, 1000), (0, 77), (900, 1), (3000, 1), (1, 1)]
    _backend_check(specs, 16, 8, 128, 16, 16, dtype)


# ---------------------------------------------------------------- elementwise


def _rms_ref(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.double()
    return w.double() * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)


@pytest.mark.parametrize(
    "dtype,shape",
    [(torch.float32, (5, 48)), (torch.bfloat16, (3, 100))]
    + [pytest.param(dt, s, marks=gpu) for dt in (torch.float32, torch.bfloat16)
       for s in ((1, 1024), (257, 3584), (4096, 1024))],
)  # fmt: skip
def test_rms_norm_with_and_without_residual(dtype: torch.dtype, shape) -> None:
    x = torch.randn(shape, device=DEV).to(dtype)
    r = torch.randn(shape, device=DEV).to(dtype)
    w = (1 + 0.1 * torch.randn(shape[1], device=DEV)).to(dtype)
    out = torch.full_like(x, float("nan"))
    rms_norm(x, w, 1e-6, out=out)
    assert rel_err(out, _rms_ref(x, w, 1e-6)) < TOL[dtype]
    summed = (x.double() + r.double()).to(dtype)
    res = r.clone()
    out.fill_(float("nan"))
    _, new_res = rms_norm(x, w, 1e-6, residual=res, out=out)
    assert new_res is res
    if CUDA or dtype == torch.float32:
        assert torch.equal(res, summed)  # same rounding as the eager bf16 add
    else:  # the interpreter truncates fp32 -> bf16 instead of rounding to nearest
        assert rel_err(res, summed) < 1e-2
    assert rel_err(out, _rms_ref(summed, w, 1e-6)) < TOL[dtype]


def test_rms_norm_per_head_on_a_strided_view_in_place() -> None:
    # Qwen3 q-norm: [T, H, D] view into a fused qkv buffer, normalised in place.
    t, h, d = 6, 3, 32
    qkv = torch.randn(t, (h + 2) * d, device=DEV)
    q = qkv[:, : h * d].view(t, h, d)
    expect = _rms_ref(q, torch.ones(d, device=DEV) * 0.5, 1e-5)
    rest = qkv[:, h * d :].clone()
    rms_norm(q, torch.full((d,), 0.5, device=DEV), 1e-5, out=q)
    assert rel_err(q, expect) < 1e-5
    assert torch.equal(qkv[:, h * d :], rest)


@pytest.mark.parametrize(
    "dtype,shape",
    [
        (torch.float32, (4, 2 * 40)),
        (torch.bfloat16, (2, 2 * 1500)),
        pytest.param(torch.bfloat16, (512, 2 * 18944), marks=gpu),
    ],
)
def test_silu_and_mul(dtype: torch.dtype, shape) -> None:
    x = torch.randn(shape, device=DEV).to(dtype)
    out = torch.full((shape[0], shape[1] // 2), float("nan"), device=DEV, dtype=dtype)
    silu_and_mul(x, out=out)
    g, u = x.double().chunk(2, dim=-1)
    assert rel_err(out, torch.nn.functional.silu(g) * u) < TOL[dtype]


@pytest.mark.parametrize(
    "dtype,heads,d",
    [
        (torch.float32, (4, 2), 32),
        (torch.bfloat16, (3, 1), 16),
        pytest.param(torch.bfloat16, (28, 4), 128, marks=gpu),
        pytest.param(torch.float32, (16, 8), 128, marks=gpu),
    ],
)
def test_rotary_matches_rotate_half(dtype: torch.dtype, heads, d: int) -> None:
    t, (hq, hk), max_pos = 7, heads, 64
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv)
    cos_full = torch.cat([freqs, freqs], -1).cos().to(DEV)  # engine layout [max_pos, D]
    sin_full = torch.cat([freqs, freqs], -1).sin().to(DEV)
    qkv = torch.randn(t, (hq + 2 * hk) * d, device=DEV).to(dtype)
    q = qkv[:, : hq * d].view(t, hq, d)
    k = qkv[:, hq * d : (hq + hk) * d].view(t, hk, d)
    pos = torch.randint(0, max_pos, (t,), device=DEV)

    def ref(x: torch.Tensor) -> torch.Tensor:
        x = x.double()
        c, s = cos_full[pos].double()[:, None], sin_full[pos].double()[:, None]
        x1, x2 = x.chunk(2, -1)
        return x * c + torch.cat([-x2, x1], -1) * s

    q_ref, k_ref, v_before = ref(q), ref(k), qkv[:, (hq + hk) * d :].clone()
    apply_rotary(pos, q, k, cos_full[:, : d // 2], sin_full[:, : d // 2])
    assert rel_err(q, q_ref) < TOL[dtype] and rel_err(k, k_ref) < TOL[dtype]
    assert torch.equal(qkv[:, (hq + hk) * d :], v_before)


# ---------------------------------------------------------------- wiring into the model


def test_model_with_fused_kernels_matches_eager_layers(
    tiny_checkpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The decoder with fused RMSNorm+residual, SiLU-and-mul and RoPE (Triton; interpreted
    on CPU) generates the tokens of the plain torch layers (fp32, greedy), Qwen3 q/k norms
    and GQA included."""
    import gpu_engine.layers.activation as act_mod
    import gpu_engine.layers.norm as norm_mod
    import gpu_engine.layers.rotary as rope_mod
    from gpu_engine import LLM, SamplingParams

    path = tiny_checkpoint("qwen3")
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [40]]
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    kw = dict(device=DEV, dtype="float32", kv_cache_tokens=512)
    plain = [o.token_ids for o in LLM(str(path), **kw).generate(prompts, params)]
    calls = {"n": 0}

    def always(x: torch.Tensor) -> bool:
        calls["n"] += 1
        return True

    for mod in (act_mod, norm_mod, rope_mod):
        monkeypatch.setattr(mod, "use_fused", always)
    fused = [o.token_ids for o in LLM(str(path), **kw).generate(prompts, params)]
    assert calls["n"] > 0
    assert fused == plain


def _use_triton_backend(runner) -> None:
    """Without CUDA: the Triton backend (interpreted kernels) in every attention layer of a
    runner built with the torch reference, as a graph path would run it."""
    backend = TritonBackend()
    for attn in runner.model.attention_layers():
        attn.backend = backend
    runner.backend = backend


def test_staged_decode_graph_path_matches_eager(tiny_checkpoint) -> None:
    """The CUDA-graph decode path (static buffers filled by ``stage_and_run``, padding rows,
    Triton backend reading only device metadata) generates the eager tokens. Without CUDA
    the 'graph' is the same forward replayed eagerly on the static buffers, and the Triton
    kernels run interpreted; on CUDA the real captured graphs run."""
    from gpu_engine import LLM, SamplingParams
    from gpu_engine.context import forward_context
    from gpu_engine.cuda_graphs import DecodeGraphs

    path = tiny_checkpoint("qwen3")
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [40], [41, 42], [43] * 20]
    # Different lengths: the batch shrinks 5 -> 1 (graph sizes 8, 4, 2, 1 with padding rows).
    params = [
        SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in (6, 2, 4, 3, 5)
    ]
    kw = dict(device=DEV, dtype="float32", kv_cache_tokens=512, max_num_seqs=8)
    eager = [
        o.token_ids for o in LLM(str(path), enforce_eager=True, **kw).generate(prompts, params)
    ]

    llm = LLM(str(path), **kw)
    runner = llm.engine.model_runner
    if not CUDA:
        _use_triton_backend(runner)
        graphs = DecodeGraphs(
            runner.model, 8, runner.max_model_len, runner.block_size,
            runner.arch.hidden_size, runner.dtype, runner.device,
            last_tokens=runner.last_tokens,
        )  # fmt: skip

        class EagerReplay:
            def __init__(self, bs: int) -> None:
                self.bs = bs

            def replay(self) -> None:  # what the captured graph runs (placeholders resolved)
                with forward_context(graphs._meta(self.bs)):
                    graphs._forward(self.bs)

        graphs.graphs = {bs: EagerReplay(bs) for bs in graphs.batch_sizes}  # type: ignore[misc]
        runner.graphs = graphs
    staged = [o.token_ids for o in llm.generate(prompts, params)]
    assert runner.graphs is not None and runner.graphs.num_replays >= 4
    assert staged == eager


def test_mixed_step_graph_layout_matches_eager(tiny_checkpoint) -> None:
    """Steps with prefill chunks through ``MixedGraphs`` (padded prefill tokens, a tile table
    with padding entries, decode rows at a fixed offset, Triton attention reading device
    metadata only) generate the eager tokens: chunked prefill next to decodes, a prefix-cache
    hit, prompts finishing their prefill mid-step. Without CUDA the layout runs eagerly on the
    static buffers with interpreted kernels; on CUDA the captured graphs replay."""
    from gpu_engine import LLM, SamplingParams
    from gpu_engine.block_tables import BlockTableMirror
    from gpu_engine.cuda_graphs import MixedGraphs

    path = tiny_checkpoint("qwen3")
    shared = list(range(5, 29))  # 24 tokens: 3 full blocks of 8 shared by two prompts
    prompts = [[*shared, 30, 31], [12, 13, 14], [40] * 90, [41, 42], [*shared, 50, 51, 52]]
    params = [
        SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in (6, 9, 4, 7, 5)
    ]
    kw = dict(
        device=DEV, dtype="float32", kv_cache_tokens=1024, max_num_seqs=4, block_size=8,
        max_num_batched_tokens=40, attention_backend="triton" if CUDA else "torch",
    )  # fmt: skip
    eager = [
        o.token_ids for o in LLM(str(path), enforce_eager=True, **kw).generate(prompts, params)
    ]

    llm = LLM(str(path), **kw)
    runner = llm.engine.model_runner
    if not CUDA:
        _use_triton_backend(runner)
        runner.mixed_graphs = MixedGraphs(
            runner.model,
            max_num_seqs=4,
            max_num_batched_tokens=40,
            max_model_len=runner.max_model_len,
            block_size=runner.block_size,
            hidden_size=runner.arch.hidden_size,
            dtype=runner.dtype,
            device=runner.device,
            mirror=BlockTableMirror(16, -(-runner.max_model_len // runner.block_size)),
            last_tokens=runner.last_tokens,
        )
    graphs = runner.mixed_graphs
    assert graphs is not None and graphs.buckets == [16, 32, 40]
    mixed = [o.token_ids for o in llm.generate(prompts, params)]
    assert graphs.num_replays >= 3
    assert llm.engine.stats()["prefix_cache_hit_tokens"] >= 24
    assert mixed == eager


def test_prefill_attention_skips_padding_tiles() -> None:
    """A tile table with padding rows (-1): the real tiles give the reference output and no
    padding entry writes anything."""
    from gpu_engine.kernels.prefill_tiles import max_prefill_tiles, prefill_tiles

    case = make_case([(3, 9), (0, 21)], 4, 2, 32, 4, torch.float32, DEV, seed=_fresh_seed())
    meta = case.meta
    q_lens = [9, 21]
    cap = max_prefill_tiles(64, 8, 16)
    tiles = prefill_tiles(q_lens, 16, cap)
    assert (tiles[:3].tolist(), (tiles[3:, 0] == -1).all()) == ([[0, 0], [1, 0], [1, 1]], True)
    with pytest.raises(ValueError, match="do not fit"):
        prefill_tiles(q_lens, 16, 2)
    out = torch.full_like(case.q, float("nan"))
    paged_prefill_attention(
        case.q, case.k_cache, case.v_cache, meta.block_tables, meta.cu_seqlens_q,
        meta.seq_lens, meta.max_query_len, 32**-0.5, out=out,
        tiles=torch.from_numpy(tiles).to(DEV), block_m=16,
    )  # fmt: skip
    assert rel_err(out, reference(case, 32**-0.5)) < TOL[torch.float32]


def test_compile_check_covers_every_kernel() -> None:
    """scripts/triton_compile_check.py (run by .ci/run) compiles every kernel for sm_90
    without a GPU; a kernel added without a variant there fails here."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "scripts/triton_compile_check.py", "--coverage"],
        cwd=repo, capture_output=True, text=True, timeout=120,
        env={**os.environ, "TRITON_INTERPRET": "0"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    assert "every kernel has a variant" in proc.stdout
