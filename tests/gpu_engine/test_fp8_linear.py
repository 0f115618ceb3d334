"""FP8 linear layers (``quantization="fp8"``): the per-token quantization kernel against the
torch quantizer (bit for bit; interpreted on the CPU), the scaled matmul against an fp64
product of the same quantized operands, the model's projections swapped at load (norms,
embedding and LM head untouched), CUDA graphs and tensor parallelism."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch
from torch import nn

import gpu_engine.kernels  # noqa: F401  (switches the interpreter on without CUDA)
from gpu_engine import LLM, SamplingParams
from gpu_engine.config import ConfigError, EngineConfig
from gpu_engine.errors import EngineError
from gpu_engine.fp8 import FP8_DTYPE, dequantize_rows, quantize_rows
from gpu_engine.kernels.quant import quantize_per_token
from gpu_engine.layers.fp8_linear import Fp8Linear, fp8_linear, quantize_linear_layers

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
gpu = pytest.mark.gpu


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(random.randrange(2**31))


@pytest.mark.parametrize("shape", [(3, 40), (2, 2500), (1, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_per_token_matches_the_torch_quantizer(shape, dtype: torch.dtype) -> None:
    gen = _gen()
    wide = torch.randn(shape[0], shape[1] + 8, generator=gen) * 5
    x = wide.to(dtype).to(DEV)[:, 3 : 3 + shape[1]]  # strided rows
    x[0, :7] = 0.0
    if shape[0] > 1:
        x[1] = 0.0  # all-zero row
    q, scale = quantize_per_token(x)
    want_q, want_scale = quantize_rows(x)
    assert q.dtype == FP8_DTYPE and q.is_contiguous()
    assert torch.equal(q.view(torch.uint8).cpu(), want_q.view(torch.uint8).cpu())
    assert torch.equal(scale.cpu(), want_scale.cpu())


def _fp64_product(x: torch.Tensor, w_q: torch.Tensor, w_s: torch.Tensor) -> torch.Tensor:
    x_q, x_s = quantize_rows(x)
    a = dequantize_rows(x_q, x_s, torch.float64).cpu()
    b = dequantize_rows(w_q, w_s, torch.float64).cpu()
    return a @ b.t()


@pytest.mark.parametrize("bias", [False, True])
def test_fp8_linear_is_the_product_of_the_quantized_operands(bias: bool) -> None:
    gen = _gen()
    x = torch.randn(5, 64, generator=gen)
    w = torch.randn(48, 64, generator=gen) * 0.1
    b = torch.randn(48, generator=gen) if bias else None
    w_q, w_s = quantize_rows(w)
    y = fp8_linear(x, w_q, w_s, b)
    want = _fp64_product(x, w_q, w_s) + (b.double() if b is not None else 0)
    assert float((y.double() - want).norm() / want.norm()) < 1e-6
    # ... and close to the unquantized product (e4m3: 3 mantissa bits on each side)
    exact = x.double() @ w.double().t() + (b.double() if b is not None else 0)
    assert float((y.double() - exact).norm() / exact.norm()) < 0.06


@gpu
@pytest.mark.parametrize("m", [1, 7, 64, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_fp8_linear_scaled_mm_gpu(m: int, bias: bool) -> None:
    """The FP8 tensor-core path (bf16 in and out) against fp64 on the same quantized
    operands: within bf16 output rounding."""
    gen = _gen()
    x = torch.randn(m, 3584, generator=gen).to(torch.bfloat16).cuda()
    w = (torch.randn(4608, 3584, generator=gen) * 0.02).cuda()
    b = torch.randn(4608, generator=gen).to(torch.bfloat16).cuda() if bias else None
    w_q, w_s = quantize_rows(w)
    y = fp8_linear(x, w_q, w_s, b)
    assert y.dtype == torch.bfloat16 and y.shape == (m, 4608)
    want = _fp64_product(x, w_q, w_s) + (b.double().cpu() if b is not None else 0)
    assert float((y.double().cpu() - want).norm() / want.norm()) < 1e-2


def test_fp8_linear_layer_keeps_the_row_parallel_reduce_before_the_bias() -> None:
    gen = _gen()
    lin = nn.Linear(32, 16, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(16, 32, generator=gen))
        lin.bias.copy_(torch.randn(16, generator=gen))
    calls = []

    def reduce(y: torch.Tensor) -> torch.Tensor:
        calls.append(y.clone())
        return 2 * y  # as if two ranks held the same partial product

    layer = Fp8Linear.from_linear(lin)
    layer.reduce = reduce
    x = torch.randn(3, 2, 32, generator=gen)  # leading dims are kept
    y = layer(x)
    assert y.shape == (3, 2, 16) and len(calls) == 1
    partial = fp8_linear(x.reshape(6, 32), layer.weight, layer.weight_scale, None)
    assert torch.equal(calls[0], partial)
    assert torch.allclose(y.reshape(6, 16), 2 * partial + lin.bias)
    with pytest.raises(EngineError, match="divisible by 16"):
        Fp8Linear.from_linear(nn.Linear(30, 16))


def test_quantize_linear_layers_swaps_only_the_projections(tiny_checkpoint: Any) -> None:
    llm = LLM(str(tiny_checkpoint("qwen2")), device="cpu", kv_cache_tokens=256, quantization="fp8")
    model = llm.engine.model_runner.model
    swapped = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, Fp8Linear)}
    assert swapped == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    assert sum(isinstance(m, Fp8Linear) for m in model.modules()) == 4 * 2  # 2 layers
    assert not any(type(m) is nn.Linear and m is not model.lm_head for m in model.modules())
    assert model.lm_head.weight.dtype == torch.float32
    assert model.model.layers[0].self_attn.qkv_proj.weight.dtype == FP8_DTYPE
    assert model.model.layers[0].self_attn.qkv_proj.bias is not None  # Qwen2 q/k/v bias
    with pytest.raises(EngineError, match="no projections"):
        quantize_linear_layers(nn.Sequential(nn.ReLU()))
    with pytest.raises(ConfigError, match="quantization"):
        EngineConfig(model="m", quantization="int4")


def test_fp8_weights_logits_stay_close_to_the_unquantized_model(tiny_checkpoint: Any) -> None:
    """Teacher-forced logits of the FP8 model against the fp32 one on a tiny checkpoint: the
    argmax mostly agrees and the relative error is that of 3-bit mantissas, not garbage."""
    from tests.gpu_engine.test_tensor_parallel import greedy_with_logits

    path = str(tiny_checkpoint("llama"))
    prompts = [[random.Random(i).randrange(3, 500) for _ in range(20 + i)] for i in range(4)]
    kw: dict[str, Any] = dict(device="cpu", kv_cache_tokens=512)
    _, want = greedy_with_logits(LLM(path, **kw).engine, prompts)
    _, got = greedy_with_logits(LLM(path, quantization="fp8", **kw).engine, prompts)
    firsts = [(g[0], w[0]) for g, w in zip(got, want, strict=True)]  # same context: teacher
    agree = sum(int(g.argmax() == w.argmax()) for g, w in firsts)
    err = max(float((g - w).norm() / w.norm()) for g, w in firsts)
    assert agree >= 3 and err < 0.25, (agree, err)


@pytest.mark.parametrize("arch", ["llama", "qwen2"], ids=["untied", "tied"])
def test_fp8_lm_head_quantizes_the_head_too(tiny_checkpoint: Any, arch: str) -> None:
    """quantization="fp8-lm-head": the head computes logits from an FP8 copy of its rows
    (the quantized product of the hidden state), its model-dtype weight freed when untied
    and kept as the embedding when tied; greedy tokens stay those of "fp8" nearly always."""
    from tests.gpu_engine.test_tensor_parallel import greedy_with_logits

    path = str(tiny_checkpoint(arch))
    prompts = [[random.Random(i).randrange(3, 500) for _ in range(20 + i)] for i in range(4)]
    kw: dict[str, Any] = dict(device="cpu", kv_cache_tokens=512)
    llm = LLM(path, quantization="fp8-lm-head", **kw)
    model = llm.engine.model_runner.model
    head = model.lm_head
    assert isinstance(head.quantized, Fp8Linear) and head.quantized.weight.dtype == FP8_DTYPE
    if arch == "llama":
        assert head.weight.numel() == 0
    else:
        assert head.weight is model.model.embed_tokens.weight and head.weight.numel() > 0
    hidden = torch.randn(3, model.config.hidden_size, generator=_gen())
    want = fp8_linear(hidden, head.quantized.weight, head.quantized.weight_scale, None)
    assert torch.equal(head(hidden), want)
    _, got = greedy_with_logits(llm.engine, prompts)
    _, ref = greedy_with_logits(LLM(path, quantization="fp8", **kw).engine, prompts)
    firsts = [(g[0], w[0]) for g, w in zip(got, ref, strict=True)]
    err = max(float((g - w).norm() / w.norm()) for g, w in firsts)
    assert sum(int(g.argmax() == w.argmax()) for g, w in firsts) >= 3 and err < 0.25, err


def test_fp8_lm_head_refuses_a_vocab_fp8_matmuls_cannot_take(tiny_checkpoint: Any) -> None:
    path = str(tiny_checkpoint("llama", vocab_size=520))  # 520 rows: not a multiple of 16
    with pytest.raises(EngineError, match="divisible by 16"):
        LLM(path, device="cpu", kv_cache_tokens=256, quantization="fp8-lm-head")
    assert LLM(path, device="cpu", kv_cache_tokens=256, quantization="fp8").engine


@pytest.mark.timeout(180)
def test_fp8_weights_with_tensor_parallelism(tiny_checkpoint: Any) -> None:
    """TP=2 with FP8 weights: each rank quantizes its shards; logits stay close to TP=1's
    FP8 model (row-parallel scales cover a rank's half of the input dim)."""
    from tests.gpu_engine.test_tensor_parallel import greedy_with_logits

    path = str(tiny_checkpoint("llama"))
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12], [40, 41, 42]]
    kw: dict[str, Any] = dict(kv_cache_tokens=512, block_size=8, quantization="fp8")
    _, want = greedy_with_logits(LLM(path, **kw).engine, prompts)
    with LLM(path, tensor_parallel_size=2, **kw) as two:
        layer = two.engine.model_runner.model.model.layers[0]
        assert isinstance(layer.mlp.down_proj, Fp8Linear) and layer.mlp.down_proj.reduce
        _, got = greedy_with_logits(two.engine, prompts)
    g, w = got[0][0], want[0][0]
    assert float((g - w).norm() / w.norm()) < 0.25
    # The LM head in FP8 too: each rank quantizes its vocab shard, rank 0 gathers the logits.
    kw["quantization"] = "fp8-lm-head"
    _, want = greedy_with_logits(LLM(path, **kw).engine, prompts)
    with LLM(path, tensor_parallel_size=2, **kw) as two:
        assert isinstance(two.engine.model_runner.model.lm_head.quantized, Fp8Linear)
        _, got = greedy_with_logits(two.engine, prompts)
    g, w = got[0][0], want[0][0]
    assert g.shape == w.shape and float((g - w).norm() / w.norm()) < 0.25


@gpu
@pytest.mark.skipif(not CUDA, reason="CUDA graphs")
def test_fp8_weights_cuda_graphs_match_eager(tiny_checkpoint: Any) -> None:
    """bf16 model with FP8 projections (tensor-core paths): decode and mixed-step graphs give
    the eager tokens, FP8 KV on top as well. bf16 attention rounds differently in graphs
    (split counts fixed at capture), so a late near-tie may flip: the first 8 tokens of
    every sequence must agree, and nearly all tokens."""
    path = str(tiny_checkpoint("qwen2"))
    prompts = [[random.Random(i).randrange(3, 500) for _ in range(5 + 9 * i)] for i in range(6)]
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    for kv in ("auto", "fp8"):
        kw: dict[str, Any] = dict(
            dtype="bfloat16", kv_cache_tokens=4096, max_num_seqs=8, max_num_batched_tokens=64,
            quantization="fp8", kv_cache_dtype=kv,
        )  # fmt: skip
        eager = LLM(path, enforce_eager=True, **kw).generate(prompts, greedy)
        llm = LLM(path, **kw)
        got = llm.generate(prompts, greedy)
        assert llm.engine.model_runner.graphs is not None
        _assert_batch_one_tuned(llm.engine.model_runner.model)
        pairs = [(g.token_ids, e.token_ids) for g, e in zip(got, eager, strict=True)]
        assert all(g[:8] == e[:8] for g, e in pairs), kv
        same = sum(a == b for g, e in pairs for a, b in zip(g, e, strict=True))
        assert same >= 0.9 * sum(len(e) for _, e in pairs), kv


@pytest.mark.parametrize(("m", "n", "k", "bias"), [(1, 48, 64, True), (5, 40, 272, False)])
def test_fused_small_m_kernel_matches_the_reference(m: int, n: int, k: int, bias: bool) -> None:
    """Quantize-and-multiply in one kernel (interpreted on the CPU) = quantize_rows followed
    by the fp32 product of the e4m3 operands; on CUDA in bf16 within output rounding."""
    from gpu_engine.kernels.fp8_gemm import fp8_small_m_linear

    gen = _gen()
    dtype = torch.bfloat16 if CUDA else torch.float32
    x = (torch.randn(m, k, generator=gen) * 3).to(dtype).to(DEV)
    w_q, w_s = quantize_rows(torch.randn(n, k, generator=gen).to(DEV))
    b = torch.randn(n, generator=gen).to(dtype).to(DEV) if bias else None
    y = fp8_small_m_linear(x, w_q, w_s, b)
    x_q, x_s = quantize_rows(x)
    want = (x_q.double() @ w_q.double().t()) * x_s.double()[:, None] * w_s.double()[None, :]
    if b is not None:
        want = want + b.double()
    err = float((y.double() - want).norm() / want.norm())
    assert y.dtype == dtype and err < (1e-2 if CUDA else 1e-6), err


@pytest.mark.parametrize("tile", [(16, 64), (16, 2048)], ids=["acc2d", "acc1d"])
@pytest.mark.parametrize("prefetch", [False, True], ids=["plain", "prefetch"])
@pytest.mark.parametrize(
    ("n", "k", "split", "bias"),
    [(48, 256, 1, True), (40, 272, 3, False), (96, 512, 4, True), (32, 9000, 2, False)],
)
def test_split_k_gemv_matches_the_reference(
    n: int, k: int, split: int, bias: bool, prefetch: bool, tile: tuple[int, int]
) -> None:
    """The batch-1 kernel (interpreted on the CPU): split over K, the last program of each
    channel block sums the parts; the same product as quantize_rows and the fp32 product of
    the e4m3 operands, twice in a row (each call leaves its workspace at zero); with and
    without the next weight tile loaded ahead; small tiles keep a 2-D accumulator, large
    ones sum every step (ACC_1D); x longer than GEMV_X_BLOCK takes several loads for its
    scale."""
    from gpu_engine.kernels.fp8_gemm import GemvConfig, fp8_gemv, gemv_workspace

    gen = _gen()
    dtype = torch.bfloat16 if CUDA else torch.float32
    x = (torch.randn(1, k, generator=gen) * 3).to(dtype).to(DEV)
    w_q, w_s = quantize_rows(torch.randn(n, k, generator=gen).to(DEV))
    b = torch.randn(n, generator=gen).to(dtype).to(DEV) if bias else None
    x_q, x_s = quantize_rows(x)
    want = (x_q.double() @ w_q.double().t()) * x_s.double()[:, None] * w_s.double()[None, :]
    if b is not None:
        want = want + b.double()
    workspace = gemv_workspace(n, x.device)
    for _ in range(2):
        y = fp8_gemv(x, w_q, w_s, b, workspace, GemvConfig(*tile, 4, split), prefetch)
        err = float((y.double() - want).norm() / want.norm())
        assert y.dtype == dtype and err < (1e-2 if CUDA else 1e-6), err
        assert not workspace[0].any() and not workspace[1].any()
    with pytest.raises(ValueError, match="do not fit"):
        fp8_gemv(x.expand(2, k), w_q, w_s, b, workspace)


def _assert_batch_one_tuned(model: nn.Module) -> None:
    """Every FP8 layer's weight shape got a GEMV launch picked at load."""
    from gpu_engine.kernels.fp8_gemm import GEMV_CANDIDATES, tuned_gemv

    for layer in (m for m in model.modules() if isinstance(m, Fp8Linear)):
        n, k = layer.weight.shape
        assert tuned_gemv(n, k, layer.weight.device) in GEMV_CANDIDATES, (n, k)


@gpu
@pytest.mark.skipif(not CUDA, reason="times the kernel's launches on the device")
def test_tune_gemv_keeps_a_candidate_and_fp8_gemv_uses_it() -> None:
    """The tuned launch is one of the candidates, kept for the shape, what a call without a
    config uses; every candidate computes the same product."""
    from gpu_engine.kernels.fp8_gemm import (
        GEMV_CANDIDATES,
        fp8_gemv,
        gemv_workspace,
        tune_gemv,
        tuned_gemv,
    )

    n, k = 2064, 5120  # a shape no other test tunes
    gen = _gen()
    w_q, w_s = quantize_rows((torch.randn(n, k, generator=gen) * 0.02).to(DEV))
    x = torch.randn(1, k, generator=gen).to(torch.bfloat16).to(DEV)
    workspace = gemv_workspace(n, x.device)
    assert tuned_gemv(n, k, x.device) is None
    cfg = tune_gemv(w_q, w_s, workspace)
    assert cfg in GEMV_CANDIDATES and tuned_gemv(n, k, x.device) is cfg
    assert tune_gemv(w_q, w_s, workspace) is cfg  # timed once per shape
    x_q, x_s = quantize_rows(x)
    want = (x_q.double() @ w_q.double().t()) * x_s.double()[:, None] * w_s.double()[None, :]
    assert torch.equal(
        fp8_gemv(x, w_q, w_s, None, workspace), fp8_gemv(x, w_q, w_s, None, workspace, cfg)
    )
    for candidate in GEMV_CANDIDATES:
        y = fp8_gemv(x, w_q, w_s, None, workspace, candidate)
        assert float((y.double() - want).norm() / want.norm()) < 1e-2, candidate
