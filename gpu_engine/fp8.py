"""FP8 (e4m3) quantization in torch: the reference the Triton kernels are checked against.

One format everywhere: ``float8_e4m3fn`` values with an fp32 scale per row, where a row is
one KV head of one token in the KV cache, one output channel of a weight, or one token of an
activation. ``scale = amax(|row|) * fp32(1/448)`` (1 for an all-zero row), the stored value
is ``row * (1 / scale)`` clamped to ±448 and rounded to nearest-even, and ``value * scale``
reads it back. Only correctly rounded operations (a multiply by a constant, one reciprocal
per row, multiplies), so the Triton kernels (``kernels.fp8_math``) compute the same bits on
any device and a cache written by either is the same cache. (A division by a Python scalar
would not do: torch turns it into a multiply by the reciprocal on CUDA but not on the CPU.)
"""

from __future__ import annotations

import torch

E4M3_MAX = 448.0
INV_E4M3_MAX = 1.0 / 448.0  # rounded to fp32 where it is used, as in the kernels
FP8_DTYPE = torch.float8_e4m3fn


def is_fp8_kv(kv_cache_dtype: str) -> bool:
    return kv_cache_dtype in ("fp8", "fp8_e4m3")


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., N] -> (e4m3 values [..., N], fp32 scales [...]) with one scale per row."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax * INV_E4M3_MAX, torch.ones_like(amax))
    q = (xf * torch.reciprocal(scale)).clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)
    return q, scale.squeeze(-1)


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(e4m3 [..., N], fp32 [...]) -> ``dtype`` [..., N]."""
    return (q.float() * scale.unsqueeze(-1)).to(dtype)


# An FP8 cache stores V page-major: [num_blocks, num_kv_heads, head_dim, page], so the keys of
# one page sit side by side for each channel. The attention kernels' P·V product takes keys as
# its reduction axis; from this layout a tile reaches the tensor cores with 4-byte shared-memory
# reads, where the token-major layout needs one read per byte (sm_90 compile: 126 registers a
# thread instead of 195, no LDS.U8). K stays token-major: Q·K^T reduces over head_dim.
# Callers keep indexing V as [num_blocks, page, num_kv_heads, head_dim]: a permuted view.


def page_major_view(storage: torch.Tensor) -> torch.Tensor:
    """The V cache view of a contiguous block of memory shaped [num_blocks, page, KVH, D]:
    the same shape and indexing, the memory laid out [num_blocks, KVH, D, page]."""
    num_blocks, page, num_kv_heads, head_dim = storage.shape
    return storage.view(num_blocks, num_kv_heads, head_dim, page).permute(0, 3, 1, 2)


def to_page_major(cache: torch.Tensor) -> torch.Tensor:
    """A page-major copy (``page_major_view``'s layout) of a cache [num_blocks, page, KVH, D]."""
    raw = cache.view(torch.uint8) if cache.dtype == FP8_DTYPE else cache  # CPU float8 copies
    out = raw.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    return out.view(cache.dtype) if cache.dtype == FP8_DTYPE else out


def is_page_major(cache: torch.Tensor) -> bool:
    """Whether ``cache`` [num_blocks, page, KVH, D] has ``page_major_view``'s layout."""
    _, page, num_kv_heads, head_dim = cache.shape
    return cache.stride() == (page * num_kv_heads * head_dim, 1, head_dim * page, page)
