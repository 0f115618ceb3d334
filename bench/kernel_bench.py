"""Kernel micro-benchmarks on the model's shapes (CUDA; --smoke: tiny shapes anywhere), medians.

1. Fused RMSNorm+residual, SiLU-and-mul and RoPE: Triton vs eager torch vs torch.compile,
   with effective bandwidth (minimal bytes: inputs read once, outputs written once).
2. Paged decode attention (Qwen3-0.6B heads, 256 sequences x 1024 tokens, pages of 16 in
   random order): achieved bandwidth of the K/V reads; paged prefill attention (4 x 2048
   causal) in TFLOP/s next to torch SDPA on the same data laid out contiguously.

    python bench/kernel_bench.py [--no-compile]
    python bench/kernel_bench.py --smoke   # tiny shapes on any device (Triton's interpreter
                                           # on a CPU), wall-clock medians, no torch.compile
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from gpu_engine.kernels.activation import silu_and_mul
from gpu_engine.kernels.decode_attention import choose_num_splits, paged_decode_attention
from gpu_engine.kernels.norm import rms_norm
from gpu_engine.kernels.prefill_attention import paged_prefill_attention
from gpu_engine.kernels.rotary import apply_rotary


def eager_add_rms(x: torch.Tensor, r: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    h = x + r
    hf = h.float()
    return w * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(h.dtype), h


def eager_silu(x: torch.Tensor) -> torch.Tensor:
    g, u = x.chunk(2, dim=-1)
    return F.silu(g) * u


def eager_rope(pos, q, k, cos, sin):  # cos/sin [max_pos, D] (duplicated halves)
    c = cos[pos].unsqueeze(1).to(q.dtype)
    s = sin[pos].unsqueeze(1).to(q.dtype)

    def rot(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    return q * c + rot(q) * s, k * c + rot(k) * s


DEV = "cuda" if torch.cuda.is_available() else "cpu"
# (tokens, hidden, intermediate, query heads, KV heads) of the fused element-wise kernels.
SHAPES = ((256, 1024, 3072, 16, 8), (4096, 3584, 18944, 28, 4))
SMOKE_SHAPES = ((8, 64, 128, 2, 1),)
# Paged decode attention (sequences, context) and paged prefill (sequences, tokens each).
DECODE = ((256, 1024), (64, 4096), (8, 512))
SMOKE_DECODE = ((2, 64),)
PREFILL, SMOKE_PREFILL = (4, 2048), (1, 32)


def bench(fn: Callable[[], object]) -> float:
    """Median milliseconds of ``fn``: do_bench on CUDA; off CUDA (the smoke run) a
    wall-clock median of a few calls."""
    if DEV == "cuda":
        # Imported here, after gpu_engine.kernels chose compiled or interpreted kernels.
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, any device")
    args = ap.parse_args()
    if not args.smoke and DEV != "cuda":
        sys.exit("needs a CUDA device (--smoke runs tiny shapes anywhere)")
    dev, dt = DEV, torch.bfloat16
    rows = []
    for tokens, hidden, inter, hq, hk in SMOKE_SHAPES if args.smoke else SHAPES:
        x = torch.randn(tokens, hidden, device=dev, dtype=dt)
        r = torch.randn_like(x)
        w = torch.randn(hidden, device=dev, dtype=dt)
        gu = torch.randn(tokens, 2 * inter, device=dev, dtype=dt)
        q = torch.randn(tokens, hq, 128, device=dev, dtype=dt)
        k = torch.randn(tokens, hk, 128, device=dev, dtype=dt)
        pos = torch.randint(0, 4096, (tokens,), device=dev)
        inv = 1.0 / (1e6 ** (torch.arange(0, 128, 2, device=dev).float() / 128))
        freqs = torch.outer(torch.arange(4096, device=dev).float(), inv)
        cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()
        e = x.element_size()
        half_cos, half_sin = cos[:, :64], sin[:, :64]
        # name: (minimal bytes, eager fn, fused fn, eager args, fused args)
        cases = {
            "add+RMSNorm": (4 * x.numel() * e, eager_add_rms,
                            lambda a, b, c: rms_norm(a, c, 1e-6, residual=b), (x, r, w), (x, r, w)),
            "SiLU-and-mul": (1.5 * gu.numel() * e, eager_silu, silu_and_mul, (gu,), (gu,)),
            "RoPE q+k": (2 * (q.numel() + k.numel()) * e, eager_rope, apply_rotary,
                         (pos, q, k, cos, sin), (pos, q, k, half_cos, half_sin)),
        }  # fmt: skip
        for name, (nbytes, fn, fused, eager_args, fused_args) in cases.items():
            t_eager = bench(lambda f=fn, a=eager_args: f(*a))
            t_fused = bench(lambda f=fused, a=fused_args: f(*a))
            t_comp = float("nan")
            if not (args.no_compile or args.smoke) and tokens == 256:
                compiled = torch.compile(fn, dynamic=False)
                compiled(*eager_args)
                t_comp = bench(lambda c=compiled, a=eager_args: c(*a))
            rows.append((name, tokens, hidden, t_eager, t_fused, t_comp, nbytes))
    print("| op | tokens x hidden | eager us | Triton us | torch.compile us | Triton GB/s |")
    print("|---|---|---|---|---|---|")
    for name, tokens, hidden, te, tf, tc, nb in rows:
        comp = "-" if tc != tc else f"{tc * 1e3:.1f}"
        print(
            f"| {name} | {tokens}x{hidden} | {te * 1e3:.1f} | {tf * 1e3:.1f} | {comp} | "
            f"{nb / (tf * 1e-3) / 1e9:.0f} |"
        )
    attention_table(args.smoke)
    return 0


def attention_table(smoke: bool) -> None:
    dev, dt = DEV, torch.bfloat16
    hq, hk, d, page = 16, 8, 128, 16
    if smoke:
        hq, hk = 2, 1
    sms = torch.cuda.get_device_properties(0).multi_processor_count if dev == "cuda" else 4
    print("\n| attention kernel | shape | time us | achieved |")
    print("|---|---|---|---|")
    for bs, ctx in SMOKE_DECODE if smoke else DECODE:
        nblk = bs * ctx // page
        kc = torch.randn(nblk, page, hk, d, device=dev, dtype=dt)
        vc = torch.randn_like(kc)
        bt = torch.randperm(nblk, device=dev, dtype=torch.int32).view(bs, ctx // page)
        sl = torch.full((bs,), ctx, device=dev, dtype=torch.int32)
        q = torch.randn(bs, hq, d, device=dev, dtype=dt)

        sp = choose_num_splits(bs, hk, ctx, sms)
        t = bench(lambda q=q, kc=kc, vc=vc, bt=bt, sl=sl, sp=sp: paged_decode_attention(
            q, kc, vc, bt, sl, d**-0.5, num_splits=sp))  # fmt: skip
        nbytes = 2 * kc.numel() * kc.element_size()
        print(f"| paged decode (split-K {sp}) | {bs} seqs x {ctx} ctx | {t * 1e3:.1f} | "
              f"{nbytes / (t * 1e-3) / 1e12:.2f} TB/s K/V read |")  # fmt: skip
        del kc, vc
    nseq, n = SMOKE_PREFILL if smoke else PREFILL
    kc = torch.randn(nseq * n // page, page, hk, d, device=dev, dtype=dt)
    vc = torch.randn_like(kc)
    bt = torch.arange(nseq * n // page, device=dev, dtype=torch.int32).view(nseq, -1)
    bt = bt[:, torch.randperm(bt.shape[1], device=dev)].contiguous()
    q = torch.randn(nseq * n, hq, d, device=dev, dtype=dt)
    cu = torch.arange(0, nseq * n + 1, n, device=dev, dtype=torch.int32)
    sl = torch.full((nseq,), n, device=dev, dtype=torch.int32)
    flops = nseq * 4 * d * hq * n * n / 2  # causal: half the score matrix
    t = bench(lambda: paged_prefill_attention(q, kc, vc, bt, cu, sl, n, d**-0.5))
    print(f"| paged prefill (FA2, Triton) | {nseq} x {n} causal | {t * 1e3:.1f} | "
          f"{flops / (t * 1e-3) / 1e12:.0f} TFLOP/s |")  # fmt: skip
    qs = q.view(nseq, n, hq, d).transpose(1, 2)
    ks = torch.randn(nseq, hk, n, d, device=dev, dtype=dt)
    vs = torch.randn_like(ks)
    t = bench(lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True))
    print(f"| torch SDPA (contiguous) | {nseq} x {n} causal | {t * 1e3:.1f} | "
          f"{flops / (t * 1e-3) / 1e12:.0f} TFLOP/s |")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
