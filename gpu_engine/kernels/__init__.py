"""Triton kernels for the CUDA fast path.

Each module holds one kernel family and a thin Python launcher that checks shapes:
``kv_cache`` (store K/V by slot mapping), ``decode_attention`` (paged, split-K),
``prefill_attention`` (paged, FlashAttention-2 style, prefix hits and chunked prefill),
``shared_prefix`` (a group's common prefix attended once), ``norm`` (RMSNorm with fused
residual add), ``activation`` (SiLU-and-mul), ``rotary`` (RoPE), ``fp8_gemm`` and ``quant``
(FP8 linear layers), ``sampling``. The attention kernels share ``kv_tiles`` (a paged K/V tile
and one online-softmax step over it); the FP8 writers share ``fp8_math``.

Triton compiles these for CUDA only. On a machine without a CUDA device they run under
Triton's interpreter (numpy on the host, CPU tensors): this module switches the interpreter on
in that case *before* any kernel is defined, because Triton picks compiled vs interpreted at
``@triton.jit`` decoration time. That is what lets the CPU test suite check the kernels.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The interpreter computes ``tl.dot`` of bf16/fp16 operands on their raw bits (seen with
# triton 3.9 on CPU), so kernels upcast dot operands to fp32 when interpreting.
INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"


# The model's RMSNorm / SiLU-and-mul / RoPE layers use the fused Triton kernels on CUDA tensors;
# CHATQ_FUSED_KERNELS=0 keeps them on the eager torch ops (for A/B measurements).
FUSED_KERNELS: bool = os.environ.get("CHATQ_FUSED_KERNELS", "1") != "0"


# FP8 linear layers with at most 16 rows use the fused quantize-and-multiply Triton kernel
# (kernels.fp8_gemm) on CUDA; CHATQ_FP8_SMALL_M=0 sends them to torch._scaled_mm as well.
FP8_SMALL_M: bool = os.environ.get("CHATQ_FP8_SMALL_M", "1") != "0"
# ... and one row (batch-1 decode) the split-K kernel (kernels.fp8_gemm.fp8_gemv);
# CHATQ_FP8_GEMV=0 leaves it to the choice above.
FP8_GEMV: bool = os.environ.get("CHATQ_FP8_GEMV", "1") != "0"
# At load, each FP8 layer's weight shape picks its fastest GEMV launch (fp8_gemm.tune_gemv);
# CHATQ_FP8_GEMV_TUNE=0 keeps the one default launch for every shape.
FP8_GEMV_TUNE: bool = os.environ.get("CHATQ_FP8_GEMV_TUNE", "1") != "0"
# CHATQ_FP8_GEMV_PREFETCH=1: the GEMV's programs load the next weight tile while they multiply
# one (an A/B switch until the H100 says which wins).
FP8_GEMV_PREFETCH: bool = os.environ.get("CHATQ_FP8_GEMV_PREFETCH", "0") == "1"


# CUDA samplers draw from Philox keys and sample in one kernel (kernels.sampling);
# CHATQ_KEYED_SAMPLING=0 keeps them on per-request torch.Generators and torch ops (A/B).
KEYED_SAMPLING: bool = os.environ.get("CHATQ_KEYED_SAMPLING", "1") != "0"


def use_fused(x: torch.Tensor) -> bool:
    return FUSED_KERNELS and x.is_cuda


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for ``tl.dot``: exact fp32 for fp32 models (no tf32 surprises in
    greedy parity), the native path for 16-bit operands."""
    return "ieee" if dtype == torch.float32 else "tf32"


# An FP8 cache's tiles meet a bf16 query as fp16 dot operands: Hopper converts e4m3 to fp16
# with one instruction per pair of values, to bf16 only through fp16 and fp32 (several). fp16
# holds every e4m3 value exactly and q with more mantissa than bf16 (range: |q| < 65,504).
# CHATQ_FP8_KV_FP16_DOT=0 converts to bf16 (the A/B in bench/fp8_kernels.py).
FP8_FP16_DOT: bool = os.environ.get("CHATQ_FP8_KV_FP16_DOT", "1") != "0"
# Keys per tile of the decode and shared-prefix kernels over an FP8 cache (bf16 model);
# CHATQ_FP8_KV_TILE=64 is the A/B (scripts/device_round16.sh nano): at 2 stages the kernel
# alone measured faster at 64, the engine at 128; 128 in 3 stages beats both (benchmarks.md).
FP8_KV_TILE: int = int(os.environ.get("CHATQ_FP8_KV_TILE", "128"))
if FP8_KV_TILE not in (32, 64, 128):
    raise ValueError(f"CHATQ_FP8_KV_TILE must be 32, 64 or 128, got {FP8_KV_TILE}")


def fp16_dot(q: torch.Tensor, kv_scales: object) -> bool:
    """Whether a launch multiplies FP8 K/V tiles in fp16 (compiled, bf16 queries only: fp32
    models keep fp32 dots, and the interpreter upcasts everything)."""
    return FP8_FP16_DOT and kv_scales is not None and q.dtype == torch.bfloat16 and not INTERPRET


def check_kv_cache(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_scales: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check the caches an attention kernel launch reads ([num_blocks, page, num_kv_heads,
    head_dim]: K contiguous; V contiguous, or page-major for an FP8 cache, see
    ``gpu_engine.fp8``) and return the K and V scale tensors it passes: the given ones for an
    FP8 cache (checked: [num_blocks, page, num_kv_heads] fp32, contiguous), else the cache
    itself as an unused placeholder."""
    from gpu_engine.fp8 import FP8_DTYPE, is_page_major

    fp8 = k_cache.dtype == FP8_DTYPE
    if fp8 != (kv_scales is not None):
        raise ValueError("KV scales go with an FP8 cache, and only with one")
    if v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"v_cache {tuple(v_cache.shape)} vs k_cache {tuple(k_cache.shape)}")
    if not k_cache.is_contiguous():
        raise ValueError("k_cache must be contiguous")
    if fp8 and not is_page_major(v_cache):
        raise ValueError("an FP8 v_cache must be page-major (gpu_engine.fp8.page_major_view)")
    if not fp8 and not v_cache.is_contiguous():
        raise ValueError("v_cache must be contiguous")
    if kv_scales is None:
        return k_cache, k_cache
    for s in kv_scales:
        if s.shape != k_cache.shape[:3] or s.dtype != torch.float32 or not s.is_contiguous():
            raise ValueError(f"KV scales {tuple(s.shape)} {s.dtype} vs cache {k_cache.shape}")
    return kv_scales
