"""FP8 kernel micro-benchmarks (median times by do_bench; --smoke: tiny shapes, any device).

1. Paged decode attention, bf16 cache vs FP8 cache (pages of 16 in random order): time and
   the K/V bytes read per second (FP8: values + per-token scales), at two tile widths.
2. Linear layers of the Qwen2.5-7B shape at batch M: bf16 ``F.linear`` vs FP8 as the layer
   runs it (``fp8_linear``: the fused small-M kernel up to 16 rows, else quantization +
   ``torch._scaled_mm``), and its parts alone: the per-token quantization kernel,
   ``_scaled_mm``, the fused kernel; time and weight bytes read per second.

    python bench/fp8_kernels.py [--smoke]
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from functools import partial

import torch
import torch.nn.functional as F

from gpu_engine import kernels
from gpu_engine.fp8 import quantize_rows, to_page_major
from gpu_engine.kernels import decode_attention
from gpu_engine.kernels.decode_attention import (
    choose_num_splits,
    launch_constants,
    paged_decode_attention,
)
from gpu_engine.layers.fp8_linear import fp8_linear

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def bench(fn: Callable[[], object], smoke: bool) -> float:
    """Median milliseconds."""
    import triton  # after gpu_engine.kernels, which picks the interpreter without CUDA

    if smoke:
        import time

        fn()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def decode_rows(smoke: bool) -> list[str]:
    rows = []
    # (seqs, context, q heads, kv heads, tokens every sequence shares at its start): the last
    # is the spike's shape, its ~1,000-token system prompt cached once (read from L2 by all).
    shapes = [(256, 1024, 16, 8, 0), (64, 4096, 16, 8, 0), (256, 1296, 12, 2, 0),
              (256, 1296, 12, 2, 1024)]  # fmt: skip
    if smoke:
        shapes = [(4, 64, 4, 2, 0), (4, 64, 4, 2, 32)]
    sms = torch.cuda.get_device_properties(0).multi_processor_count if DEV == "cuda" else 132
    for bs, ctx, hq, hk, shared in shapes:
        d, page = 128 if not smoke else 16, 16
        nblk = bs * ctx // page
        kc = torch.randn(nblk, page, hk, d, device=DEV, dtype=torch.bfloat16)
        vc = torch.randn_like(kc)
        bt = torch.randperm(nblk, device=DEV, dtype=torch.int32).view(bs, ctx // page)
        bt[:, : shared // page] = bt[0, : shared // page].clone()
        sl = torch.full((bs,), ctx, device=DEV, dtype=torch.int32)
        q = torch.randn(bs, hq, d, device=DEV, dtype=torch.bfloat16)
        (kq, ks), (vq, vs) = quantize_rows(kc), quantize_rows(vc)
        vq = to_page_major(vq)  # an FP8 cache's V layout (gpu_engine.fp8)
        sp = choose_num_splits(bs, hk, ctx, sms)
        # FP8 tiles meet q as fp16 dot operands (the default) or as bf16 (the A/B).
        # (name, K, V, scales, keys per tile, fp16 dots, tiles in flight, register cap):
        # Triton 3.6 gives the 128-key FP8 program 167 registers (three an SM); capped at 128,
        # four fit and ptxas spills 56 bytes (gpu_notes.md).
        variants = [
            ("bf16", kc, vc, None, 64, True, 2, None),
            ("fp8, bf16 dots", kq, vq, (ks, vs), 128, False, 2, None),
            ("fp8, fp16 dots, 2 stages", kq, vq, (ks, vs), 64, True, 2, None),
            ("fp8, fp16 dots, 2 stages", kq, vq, (ks, vs), 128, True, 2, None),
            ("fp8, fp16 dots, 3 stages", kq, vq, (ks, vs), 64, True, 3, None),
            ("fp8, fp16 dots, 3 stages", kq, vq, (ks, vs), 128, True, 3, None),
            ("fp8, fp16 dots, 128 registers", kq, vq, (ks, vs), 128, True, 2, 128),
        ]
        base = None
        for name, k, v, scales, block_n, fp16, stages, regs in variants:
            run = partial(paged_decode_attention, q, k, v, bt, sl, d**-0.5, num_splits=sp,
                          kv_scales=scales, block_n=block_n, num_stages=stages,
                          max_registers=regs)  # fmt: skip
            kernels.FP8_FP16_DOT = fp16
            t = bench(run, smoke)
            kernels.FP8_FP16_DOT = True
            nbytes = 2 * (k.numel() * k.element_size() + (0 if scales is None else 4 * ks.numel()))
            base = base or t
            rows.append(
                f"| decode {name}, tile {block_n} | {bs} x {ctx}, {hq}/{hk} heads, split {sp}"
                f"{f', first {shared} shared' if shared else ''} | "
                f"{t * 1e3:.1f} | {nbytes / (t * 1e-3) / 1e12:.2f} TB/s | {base / t:.2f}x |"
            )
    return rows


def prefix_rows(smoke: bool) -> list[str]:
    """Shared-prefix attention at the spike's decode shape: 256 sequences of 12/2 heads, a
    1,024-token prefix cached once, each sequence's own suffix 16-500 tokens; the decode
    kernel over whole contexts (the prefix from L2) against the shared path (prefix kernel
    at each split count + suffix decode + merge) and the prefix kernel alone, staged as the
    engine's graphs stage it (fixed tile capacity)."""
    import numpy as np

    from gpu_engine.kernels.shared_prefix import choose_prefix_splits, launch_prefix_attention
    from gpu_engine.prefix_groups import find_prefix_groups, prefix_block_s
    from gpu_engine.shared_staging import SharedPrefixStaging

    bs, hq, hk, d, page, prefix, max_len = 256, 12, 2, 128, 16, 1024, 4096
    if smoke:
        bs, hq, hk, d, prefix, max_len = 8, 4, 2, 16, 32, 128
    gen = torch.Generator().manual_seed(0)
    lens = prefix + torch.randint(16, 500 if not smoke else 40, (bs,), generator=gen)
    blocks = [-(-int(n) // page) for n in lens]
    nblk = sum(blocks) + 1
    perm = torch.randperm(nblk, generator=gen).to(torch.int32)
    bt = torch.zeros(bs, max(blocks), dtype=torch.int32)
    at = prefix // page  # perm[:at]: the prefix's blocks, the same in every table
    for i, nb in enumerate(blocks):
        bt[i, : prefix // page] = perm[: prefix // page]
        bt[i, prefix // page : nb] = perm[at : at + nb - prefix // page]
        at += nb - prefix // page
    kc = torch.randn(nblk, page, hk, d, device=DEV, dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    q = torch.randn(bs, hq, d, device=DEV, dtype=torch.bfloat16)
    (kq, ks), (vq, vs) = quantize_rows(kc), quantize_rows(vc)
    vq = to_page_major(vq)
    block_s = prefix_block_s(hq // hk)
    staging = SharedPrefixStaging(bs, bt.shape[1], block_s, torch.device(DEV))
    positions = (lens - 1).numpy()
    groups = find_prefix_groups(bt.numpy(), np.arange(bs), positions, page, block_s)
    assert groups is not None
    staging.stage(groups, bs, page)
    shared = staging.shared(bs)
    sms = torch.cuda.get_device_properties(0).multi_processor_count if DEV == "cuda" else 132
    sp = choose_num_splits(bs, hk, max_len, sms)
    auto = choose_prefix_splits(shared.tile_group.shape[0], hk, sms)
    bt, sl = bt.to(DEV), lens.to(DEV, torch.int32)
    rows = []
    for name, k, v, scales in [("bf16", kc, vc, None), ("fp8", kq, vq, (ks, vs))]:
        base = partial(paged_decode_attention, q, k, v, bt, sl, d**-0.5, num_splits=sp,
                       kv_scales=scales)  # fmt: skip
        want = base()
        t_plain = bench(base, smoke)
        rows.append(f"| {name} | plain decode, prefix from L2 | {t_plain * 1e3:.1f} | 1.00x |")
        for ps in sorted({1, auto} if smoke else {1, 2, 4, 8, auto}):
            run = partial(base, shared=shared, prefix_splits=ps)
            err = float((run().float() - want.float()).norm() / want.float().norm())
            if err > 2e-2:
                raise AssertionError(f"{name} shared, {ps} prefix splits: rel err {err:.2e}")
            t = bench(run, smoke)
            tag = " (auto)" if ps == auto else ""
            rows.append(
                f"| {name} | shared, {ps} prefix splits{tag} | {t * 1e3:.1f} | {t_plain / t:.2f}x |"
            )
        decode_attention.FOLD_PREFIX = False  # the A/B: a merge kernel after the decode
        t = bench(partial(base, shared=shared, prefix_splits=auto), smoke)
        decode_attention.FOLD_PREFIX = True
        rows.append(
            f"| {name} | shared, {auto} prefix splits, merge kernel | {t * 1e3:.1f} | "
            f"{t_plain / t:.2f}x |"
        )
        slots = sp + auto
        part_out = torch.empty(bs, slots, hq, d, device=DEV, dtype=torch.float32)
        part_lse = torch.empty(bs, slots, hq, device=DEV, dtype=torch.float32)
        ones = torch.ones(1, device=DEV)
        common = launch_constants(q, k, scales, sp)  # what the engine's launch passes
        prefix_only = partial(launch_prefix_attention, q, k, v, scales or (ones, ones), shared,
                              part_out, part_lse, d**-0.5, sp)  # fmt: skip
        alone = {(1, common["BLOCK_N"]), (auto, common["BLOCK_N"]), (auto, 64)}
        for ps, block_n in sorted(alone if not smoke else {(auto, 64)}):
            t = bench(partial(prefix_only, prefix_splits=ps, common=dict(common, BLOCK_N=block_n)),
                      smoke)  # fmt: skip
            rows.append(
                f"| {name} | prefix kernel alone, {ps} splits, tile {block_n} | {t * 1e3:.1f} | |"
            )
    return rows


def linear_rows(smoke: bool) -> list[str]:
    from gpu_engine.kernels.fp8_gemm import fp8_small_m_linear
    from gpu_engine.kernels.quant import quantize_per_token

    rows = []
    shapes = {"qkv": (4608, 3584), "o": (3584, 3584), "gate_up": (37888, 3584),
              "down": (3584, 18944)}  # fmt: skip
    batches = [1, 8, 64, 256]
    if smoke:
        shapes, batches = {"tiny": (64, 128)}, [1, 4]
    nan = float("nan")
    for name, (n, k) in shapes.items():
        w = torch.randn(n, k, device=DEV, dtype=torch.bfloat16) * 0.02
        w_q, w_s = quantize_rows(w)
        for m in batches:
            x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
            t_bf16 = bench(partial(F.linear, x, w), smoke)
            t_fp8 = bench(partial(fp8_linear, x, w_q, w_s, None), smoke)
            t_quant = t_mm = t_small = nan
            if DEV == "cuda":
                t_quant = bench(partial(quantize_per_token, x), smoke)
                x_q, x_s = quantize_rows(x)
                mm = partial(torch._scaled_mm, x_q, w_q.t(), scale_a=x_s[:, None],
                             scale_b=w_s[None, :], out_dtype=torch.bfloat16)  # fmt: skip
                t_mm = bench(mm, smoke)
                if m <= 16:
                    t_small = bench(partial(fp8_small_m_linear, x, w_q, w_s, None), smoke)
            rows.append(
                f"| {name} {n}x{k} | {m} | {t_bf16 * 1e3:.1f} | {t_fp8 * 1e3:.1f} | "
                f"{t_quant * 1e3:.1f} | {t_mm * 1e3:.1f} | {t_small * 1e3:.1f} | "
                f"{2 * n * k / (t_bf16 * 1e-3) / 1e12:.2f} / "
                f"{n * k / (t_fp8 * 1e-3) / 1e12:.2f} TB/s | {t_bf16 / t_fp8:.2f}x |"
            )
    return rows


# (block_n, block_k, num_warps); the tiles past 16k values accumulate per step (ACC_1D).
GEMV_CONFIGS = [
    (16, 256, 4), (32, 256, 4), (32, 512, 4), (64, 256, 4), (32, 512, 8),
    (16, 1024, 4), (16, 1024, 8), (32, 1024, 8), (16, 2048, 8),
]  # fmt: skip


def gemv_rows(smoke: bool) -> list[str]:
    """The split-K batch-1 kernel (``fp8_gemv``) over block shapes and splits, per layer of
    the 7B shape: the automatic choice and the best three, against bf16 and checked against
    the reference arithmetic."""
    from gpu_engine.kernels.fp8_gemm import (
        GEMV_BLOCK_K,
        GEMV_BLOCK_N,
        GEMV_WARPS,
        GemvConfig,
        fp8_gemv,
        gemv_split,
        gemv_workspace,
        tune_gemv,
    )

    shapes = {"qkv": (4608, 3584), "o": (3584, 3584), "gate_up": (37888, 3584),
              "down": (3584, 18944)}  # fmt: skip
    configs, splits = GEMV_CONFIGS, [1, 2, 4, 8]
    if smoke:
        shapes, configs, splits = {"tiny": (64, 512)}, [(32, 128, 4), (16, 512, 4)], [1, 2]
    rows = []
    for name, (n, k) in shapes.items():
        w = torch.randn(n, k, device=DEV, dtype=torch.bfloat16) * 0.02
        w_q, w_s = quantize_rows(w)
        x = torch.randn(1, k, device=DEV, dtype=torch.bfloat16)
        ws = gemv_workspace(n, x.device)
        want = (quantize_rows(x)[0].float() @ w_q.float().t()) * quantize_rows(x)[1][:, None]
        want = want * w_s[None, :]
        t_bf16 = bench(partial(F.linear, x, w), smoke)
        timed = []
        default = (GEMV_BLOCK_N, GEMV_BLOCK_K, GEMV_WARPS)
        for (bn, bk, warps), split in itertools.product(configs, [*splits, None]):
            # The prefetching variant only for the default blocks (it lost everywhere else).
            for pre in (False, True) if (bn, bk, warps) == default else (False,):
                cfg = GemvConfig(bn, bk, warps, split)
                run = partial(fp8_gemv, x, w_q, w_s, None, ws, cfg, pre)
                err = (run().float() - want).abs().max().item() / want.abs().max().item()
                if err > 1e-2:
                    raise AssertionError(f"fp8_gemv {name} {bn}x{bk} split {split}: err {err}")
                auto = split is None
                used = gemv_split(k, bk) if auto else split
                timed.append((bench(run, smoke), bn, bk, warps, used, auto, pre))
        best = sorted(t for t in timed if not t[5])[:3]
        shown = [t for t in timed if t[5] and t[1:4] == default] + best
        if DEV == "cuda":  # what the engine's load-time tuning picks for this layer
            cfg = tune_gemv(w_q, w_s, ws)
            run = partial(fp8_gemv, x, w_q, w_s, None, ws, cfg)
            split = cfg.split or gemv_split(k, cfg.block_k)
            shown.append((bench(run, smoke), cfg.block_n, cfg.block_k, cfg.num_warps, split,
                          "tuned", False))  # fmt: skip
        for t, bn, bk, warps, split, auto, pre in shown:
            how = {True: " (auto)", False: "", "tuned": " (tune_gemv's pick)"}[auto]
            rows.append(
                f"| {name} {n}x{k} | {bn}x{bk} w{warps} split {split}{how}"
                f"{' prefetch' if pre else ''} | "
                f"{t_bf16 * 1e3:.1f} | {t * 1e3:.1f} | {n * k / (t * 1e-3) / 1e12:.2f} TB/s | "
                f"{t_bf16 / t:.2f}x |"
            )
    return rows


PARTS = ("linear", "gemv", "decode", "prefix")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument(
        "--parts",
        default="linear,gemv,decode,prefix",
        help="comma-separated: linear, gemv, decode, prefix",
    )
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    if parts - set(PARTS):
        ap.error(f"--parts: unknown {sorted(parts - set(PARTS))}")
    if "linear" in parts:
        print(
            "\n| linear (Qwen2.5-7B) | M | bf16 us | fp8 layer us | quant alone "
            "| _scaled_mm alone | fused small-M | weight read bf16 / fp8 | speed-up |\n"
            "|---|---|---|---|---|---|---|---|---|",
            flush=True,
        )
        print("\n".join(linear_rows(args.smoke)), flush=True)
    if "gemv" in parts:
        print(
            "\n| batch-1 FP8 GEMV (fp8_gemv) | blocks, split | bf16 us | fp8 us | weight read "
            "| speed-up |\n|---|---|---|---|---|---|",
            flush=True,
        )
        print("\n".join(gemv_rows(args.smoke)), flush=True)
    if "decode" in parts:
        print("\n| attention | shape | us | K/V read | vs bf16 |\n|---|---|---|---|---|")
        print("\n".join(decode_rows(args.smoke)))
    if "prefix" in parts:
        print("\n| cache | shared-prefix attention (spike shape) | us | vs plain |")
        print("|---|---|---|---|")
        print("\n".join(prefix_rows(args.smoke)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
