"""FP8 linear layer for a few rows (decode at small batch): quantization and product fused.

``y = (quant(x) @ W_q.T) * x_scale * w_scale + b`` for x [M, K] with M ≤ 16 (bf16 or fp32),
W_q [N, K] e4m3 with per-channel scales: the same arithmetic as the per-token quantization
kernel followed by ``torch._scaled_mm``, without the separate quantization launch and its
round trip through memory. At this size the product only streams the weights, so each
program owns BLOCK_N output channels: it first reads its rows of x once to find each row's
absolute maximum (x is tiny and L2-resident), then walks K in BLOCK_K steps, quantizing the
x tile in registers and multiplying it by the weight tile on the FP8 tensor cores (the
interpreter multiplies in fp32: products of two e4m3 values are exact in fp32 either way).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import triton
import triton.language as tl
import triton.testing

from gpu_engine.kernels import FP8_GEMV_PREFETCH, INTERPRET
from gpu_engine.kernels.fp8_math import e4m3_scale, to_e4m3

MAX_ROWS = 16


@triton.jit
def _fp8_small_m_kernel(
    x_ptr,
    w_ptr,
    w_scale_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_x,
    stride_w,
    stride_o,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    m = tl.arange(0, BLOCK_M)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.arange(0, BLOCK_K)
    m_mask = m < M
    n_mask = n < N
    x_rows = x_ptr + m[:, None].to(tl.int64) * stride_x
    amax = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask = m_mask[:, None] & (k0 + k < K)[None, :]
        x = tl.load(x_rows + k0 + k[None, :], mask=mask, other=0.0)
        amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
    x_scale, x_inv = e4m3_scale(tl.max(amax, 1))  # [BLOCK_M]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    w_rows = w_ptr + n[:, None].to(tl.int64) * stride_w
    for k0 in range(0, K, BLOCK_K):
        k_mask = (k0 + k < K)[None, :]
        x = tl.load(x_rows + k0 + k[None, :], mask=m_mask[:, None] & k_mask, other=0.0)
        xq = to_e4m3(x.to(tl.float32), x_inv[:, None])
        w = tl.load(w_rows + k0 + k[None, :], mask=n_mask[:, None] & k_mask, other=0.0)
        if UPCAST:
            acc += tl.dot(xq.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        else:
            acc += tl.dot(xq, tl.trans(w))
    w_scale = tl.load(w_scale_ptr + n, mask=n_mask, other=0.0)
    y = acc * x_scale[:, None] * w_scale[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    o_ptrs = out_ptr + m[:, None].to(tl.int64) * stride_o + n[None, :]
    tl.store(o_ptrs, y.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def fp8_small_m_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    num_sms: int = 132,
) -> torch.Tensor:
    """x [M, K] (M ≤ MAX_ROWS, rows contiguous), weight [N, K] e4m3, weight_scale [N] fp32,
    bias [N] or None -> [M, N] in x's dtype."""
    m, k = x.shape
    n = weight.shape[0]
    if m > MAX_ROWS or x.stride(1) != 1 or not weight.is_contiguous():
        raise ValueError(f"x {tuple(x.shape)} / weight {tuple(weight.shape)} do not fit")
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    # Enough programs to cover the SMs about twice; deep K steps keep bytes in flight.
    block_n = 64 if triton.cdiv(n, 64) >= 2 * num_sms else 32 if n >= 32 * num_sms else 16
    block_k = 128 if block_n == 64 else 256
    _fp8_small_m_kernel[(triton.cdiv(n, block_n),)](
        x,
        weight,
        weight_scale,
        bias if bias is not None else weight_scale,
        out,
        m,
        n,
        k,
        x.stride(0),
        weight.stride(0),
        out.stride(0),
        HAS_BIAS=bias is not None,
        BLOCK_M=16,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        UPCAST=INTERPRET,
        num_warps=4,
        num_stages=4,
    )
    return out


@triton.jit
def _fp8_gemv_kernel(
    x_ptr,
    w_ptr,
    w_scale_ptr,
    bias_ptr,
    out_ptr,
    ws_ptr,
    count_ptr,
    N,
    K,
    K_PER_SPLIT,
    stride_w,
    SPLIT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PREFETCH: tl.constexpr,
    X_BLOCK: tl.constexpr,
    ACC_1D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    k = tl.arange(0, BLOCK_K)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    w_rows = w_ptr + n[:, None].to(tl.int64) * stride_w
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    if PREFETCH:
        # The first weight tile is asked for before x's scale is computed, and each step
        # asks for the next tile before it multiplies: a load in flight while one computes.
        w_next = tl.load(
            w_rows + k_start + k[None, :],
            mask=n_mask[:, None] & (k_start + k < k_end)[None, :],
            other=0.0,
        )
    # The row's scale needs its whole absolute maximum: x is one row (from L2), read in as
    # few wide loads as X_BLOCK allows (one up to 4096 inputs): each is a round trip every
    # program waits for before its weights stream, whatever its share of K.
    xk = tl.arange(0, X_BLOCK)
    amax = tl.zeros([X_BLOCK], tl.float32)
    for k0 in range(0, K, X_BLOCK):
        x = tl.load(x_ptr + k0 + xk, mask=k0 + xk < K, other=0.0)
        amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
    x_scale, x_inv = e4m3_scale(tl.max(amax, 0))
    # Large tiles sum each step's products at once (a [BLOCK_N, BLOCK_K] fp32 accumulator
    # would not fit in registers).
    if ACC_1D:  # noqa: SIM108 (a constexpr branch: one shape per compiled variant)
        acc = tl.zeros([BLOCK_N], tl.float32)
    else:
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k_mask = k0 + k < k_end
        x = tl.load(x_ptr + k0 + k, mask=k_mask, other=0.0)
        xq = to_e4m3(x.to(tl.float32), x_inv).to(tl.float32)
        if PREFETCH:
            w = w_next
            k1 = k0 + BLOCK_K
            w_next = tl.load(
                w_rows + k1 + k[None, :],
                mask=n_mask[:, None] & (k1 + k < k_end)[None, :],
                other=0.0,
            )
        else:
            w = tl.load(w_rows + k0 + k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        # e4m3 x e4m3 products are exact in fp32.
        if ACC_1D:
            acc += tl.sum(w.to(tl.float32) * xq[None, :], 1)
        else:
            acc += w.to(tl.float32) * xq[None, :]
    if not ACC_1D:
        acc = tl.sum(acc, 1)
    part = acc * x_scale * tl.load(w_scale_ptr + n, mask=n_mask, other=0.0)
    if SPLIT > 1:
        # Each split adds its part; the last one to arrive (the counter) takes the sum and
        # leaves the workspace and counter at zero for the next call (no memset launch).
        tl.atomic_add(ws_ptr + n, part, mask=n_mask)
        arrived = tl.atomic_add(count_ptr + pid_n, 1)
        if arrived == SPLIT - 1:
            zero = tl.zeros([BLOCK_N], tl.float32)
            part = tl.atomic_add(ws_ptr + n, zero, mask=n_mask)  # the sum, read from L2
            tl.store(ws_ptr + n, zero, mask=n_mask)
            tl.store(count_ptr + pid_n, 0)
            if HAS_BIAS:
                part += tl.load(bias_ptr + n, mask=n_mask, other=0.0).to(tl.float32)
            tl.store(out_ptr + n, part.to(out_ptr.dtype.element_ty), mask=n_mask)
    else:
        if HAS_BIAS:
            part += tl.load(bias_ptr + n, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + n, part.to(out_ptr.dtype.element_ty), mask=n_mask)


# Measured on the H100 at batch 1 over blocks 16-64 x 128-512 and splits 1-8 (benchmarks.md):
# 32 channels x 512 inputs won or tied on every 7B layer; a split only paid for the 18,944
# inputs of down_proj (2 ranges of ~9.5k: 47.8 µs vs 62.6 bf16).
GEMV_BLOCK_N = 32
GEMV_BLOCK_K = 512
GEMV_INPUTS_PER_SPLIT = 8192
GEMV_WARPS = 4
GEMV_X_BLOCK = 4096  # inputs of x read at once for its scale
GEMV_ACC_2D_MAX = 16384  # larger tiles accumulate [BLOCK_N] sums (registers)


@dataclass(frozen=True)
class GemvConfig:
    """One launch shape of ``fp8_gemv``: channels and inputs per program step, warps per
    program, and K ranges (None: ``gemv_split``'s choice)."""

    block_n: int = GEMV_BLOCK_N
    block_k: int = GEMV_BLOCK_K
    num_warps: int = GEMV_WARPS
    split: int | None = None


# What ``tune_gemv`` times: the defaults and each 7B layer's best shapes of the H100 sweeps
# (benchmarks.md: no one shape won every layer; the best per layer was ~1-3 µs faster).
GEMV_CANDIDATES = (
    GemvConfig(),
    GemvConfig(32, 512, 8, 1),
    GemvConfig(16, 1024, 8, 1),
    GemvConfig(16, 1024, 4, 1),
    GemvConfig(16, 256, 4, 1),
    GemvConfig(16, 256, 4, 2),
    GemvConfig(16, 256, 4, 4),
    GemvConfig(32, 256, 4, 4),
)
# (device index, N, K) -> the fastest candidate measured for that weight shape.
_TUNED: dict[tuple[int, int, int], GemvConfig] = {}


def gemv_workspace(out_features: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The zeroed fp32 partial sums [N] and arrival counters of ``fp8_gemv``'s split-K
    programs: each call leaves them at zero again."""
    blocks = triton.cdiv(out_features, 16)  # enough counters for any block_n >= 16
    return (
        torch.zeros(out_features, dtype=torch.float32, device=device),
        torch.zeros(blocks, dtype=torch.int32, device=device),
    )


def gemv_split(k: int, block_k: int) -> int:
    """Splits of K: one range per GEMV_INPUTS_PER_SPLIT inputs (1 to 8, each at least one K
    step)."""
    return max(1, min(8, k // GEMV_INPUTS_PER_SPLIT, k // block_k))


def tune_gemv(
    weight: torch.Tensor, weight_scale: torch.Tensor, workspace: tuple[torch.Tensor, torch.Tensor]
) -> GemvConfig:
    """Time every GEMV_CANDIDATES launch on this weight (CUDA: medians of ``do_bench``, L2
    flushed between runs, as a decode step finds it) and keep the fastest for its shape:
    later ``fp8_gemv`` calls of that shape on that device use it. Once per shape; it
    synchronizes, so it runs at load, never under graph capture."""
    n, k = weight.shape
    if tuned_gemv(n, k, weight.device) is None:
        x = torch.randn(1, k, device=weight.device, dtype=torch.bfloat16)
        times = {
            cfg: triton.testing.do_bench(
                partial(fp8_gemv, x, weight, weight_scale, None, workspace, cfg),
                warmup=5, rep=20, return_mode="median",
            )
            for cfg in GEMV_CANDIDATES
        }  # fmt: skip
        _TUNED[(weight.device.index or 0, n, k)] = min(times, key=lambda cfg: times[cfg])
    return _TUNED[(weight.device.index or 0, n, k)]


def tuned_gemv(n: int, k: int, device: torch.device) -> GemvConfig | None:
    """``tune_gemv``'s pick for an [n, k] weight on ``device``, None if not tuned."""
    return _TUNED.get((device.index or 0, n, k))


def fp8_gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    workspace: tuple[torch.Tensor, torch.Tensor],
    config: GemvConfig | None = None,
    prefetch: bool | None = None,
) -> torch.Tensor:
    """One row: x [1, K] (bf16 or fp32, contiguous), weight [N, K] e4m3, weight_scale [N] fp32,
    bias [N] or None -> [1, N] in x's dtype, the per-token-quantized product of
    ``fp8_small_m_linear``. Batch-1 decode only streams the weights: programs own
    ``block_n`` channels of one of ``split`` K ranges (long inputs are split so their
    programs stream shorter rows). ``config``: the launch shape (default: what ``tune_gemv``
    chose for this weight's shape, else ``GemvConfig()``); ``prefetch``: each program loads
    the next weight tile while it multiplies one (default: ``FP8_GEMV_PREFETCH``)."""
    m, k = x.shape
    n = weight.shape[0]
    if m != 1 or not x.is_contiguous() or not weight.is_contiguous():
        raise ValueError(f"x {tuple(x.shape)} / weight {tuple(weight.shape)} do not fit")
    if config is None:
        config = tuned_gemv(n, k, x.device) or GemvConfig()
    block_n, block_k = config.block_n, config.block_k
    split = config.split or gemv_split(k, block_k)
    k_per_split = triton.cdiv(triton.cdiv(k, split), block_k) * block_k
    split = triton.cdiv(k, k_per_split)
    ws, counts = workspace
    if split > 1 and (ws.numel() < n or counts.numel() < triton.cdiv(n, block_n)):
        raise ValueError(f"the workspace is smaller than {n} channels")
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    _fp8_gemv_kernel[(triton.cdiv(n, block_n), split)](
        x,
        weight,
        weight_scale,
        bias if bias is not None else weight_scale,
        out,
        ws,
        counts,
        n,
        k,
        k_per_split,
        weight.stride(0),
        SPLIT=split,
        HAS_BIAS=bias is not None,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        PREFETCH=FP8_GEMV_PREFETCH if prefetch is None else prefetch,
        X_BLOCK=min(triton.next_power_of_2(k), GEMV_X_BLOCK),
        ACC_1D=block_n * block_k > GEMV_ACC_2D_MAX,
        num_warps=config.num_warps,
        num_stages=4,
    )
    return out
