"""Triton kernels for the CUDA fast path.

Each module holds one kernel family and a thin Python launcher that checks shapes:
``kv_cache`` (store K/V by slot mapping), ``decode_attention`` (paged, split-K),
``prefill_attention`` (paged, FlashAttention-2 style, prefix hits and chunked prefill),
``norm`` (RMSNorm with fused residual add), ``activation`` (SiLU-and-mul), ``rotary`` (RoPE).

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


def use_fused(x: torch.Tensor) -> bool:
    return FUSED_KERNELS and x.is_cuda


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for ``tl.dot``: exact fp32 for fp32 models (no tf32 surprises in
    greedy parity), the native path for 16-bit operands."""
    return "ieee" if dtype == torch.float32 else "tf32"
