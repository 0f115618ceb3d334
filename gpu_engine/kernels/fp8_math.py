"""Triton helpers shared by the kernels that write FP8 (e4m3) values.

``round_e4m3`` rounds fp32 to the nearest e4m3 value (ties to even) in fp32 arithmetic, so
the following ``.to(tl.float8e4nv)`` is exact. The hardware conversion rounds the same way,
but Triton's interpreter (the CPU tests) rounds values that carry into the next power of two
down by half (124.3 -> 64 instead of 128): rounding first makes compiled and interpreted
kernels and the torch reference (``gpu_engine.fp8``) agree bit for bit.
"""

from __future__ import annotations

import triton
import triton.language as tl

E4M3_MAX: tl.constexpr = tl.constexpr(448.0)
INV_E4M3_MAX: tl.constexpr = tl.constexpr(1.0 / 448.0)


@triton.jit
def round_e4m3(v):
    # v: fp32 in [-448, 448]. Normal e4m3 values (|v| >= 2^-6) keep 3 mantissa bits: add
    # half an e4m3 ulp (minus one, plus the kept lsb: ties to even) to the fp32 bits and
    # truncate. Subnormals sit on a grid of 2^-9: adding 1.5 * 2^14 (where the fp32 ulp is
    # 2^-9) and subtracting it again rounds to that grid.
    a = tl.abs(v)
    bits = a.to(tl.uint32, bitcast=True)
    lsb = (bits >> 20) & 1
    normal = ((bits + 0x7FFFF + lsb) & 0xFFF00000).to(tl.float32, bitcast=True)
    sub = (a + 24576.0) - 24576.0
    r = tl.where(a < 0.015625, sub, normal)
    # v's sign bit onto r: a tiny negative value that rounds to zero stays -0.0 (e4m3 0x80,
    # as torch stores it); compiled code negates as 0 - r, which makes +0.0.
    sign = v.to(tl.uint32, bitcast=True) & 0x80000000
    return (r.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def e4m3_scale(amax):
    """The scale of rows whose absolute maxima are ``amax`` (1 for an all-zero row) and its
    correctly rounded reciprocal, the factor that quantizes."""
    scale = tl.where(amax > 0, amax * INV_E4M3_MAX, 1.0)
    return scale, tl.math.div_rn(1.0, scale)


@triton.jit
def to_e4m3(x, inv_scale):
    """fp32 ``x`` times its reciprocal scale (broadcast to x's shape) -> e4m3, as
    gpu_engine.fp8 computes it."""
    v = x * inv_scale
    v = tl.minimum(tl.maximum(v, -E4M3_MAX), E4M3_MAX)
    return round_e4m3(v).to(tl.float8e4nv)


@triton.jit
def quantize_e4m3(x, amax):
    """x [R, N] fp32 with its row maxima ``amax`` [R] -> (e4m3 [R, N], fp32 scales [R])."""
    scale, inv = e4m3_scale(amax)
    return to_e4m3(x, inv[:, None]), scale


@triton.jit
def scaled_probs(p, v_s, dtype: tl.constexpr):
    """(p * v_s / top, top) for the P·V product over an FP8 tile: V's per-token scales
    ``v_s`` [BLOCK_N] enter relative to the tile's largest, which multiplies the product
    after it: p * v_s alone can sit below fp16's normal range (kernels.fp16_dot)."""
    top = tl.maximum(tl.max(v_s, 0), 1e-30)
    return (p * (v_s / top)[None, :]).to(dtype), top
