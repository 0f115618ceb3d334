"""Our Triton paged-attention kernels against FlashAttention's on the same GPU (issue 22).

Decode (one query per sequence) and prefill (causal, whole prompts) over a paged KV cache
whose pages sit in random order, at the head shapes of Qwen3-0.6B (16 query / 8 KV heads)
and Qwen2.5-7B (28 / 4), head dim 128, bf16. Each kernel gets the same keys and values in its
own page size: ours at the engine's 16 (and at 256, to separate the page size from the
kernel), flash-attn at 256 (what its paged API requires). Each call is captured in a CUDA
graph, as the engine runs attention, and the replay timed (medians of ``do_bench``): device
time, not Python's launch rate. Decode is reported as K/V bytes read per second, prefill as
TFLOP/s (causal: half the scores). Outputs are checked against each other.

    python3 bench/attention_race.py               # needs flash-attn (scripts/device_flash_attn.sh)
    python3 bench/attention_race.py --smoke       # tiny shapes, our kernels only (CPU: Triton's
                                                  # interpreter, wall-clock medians)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from bench import smoke
from bench.kernel_bench import DEV, bench
from gpu_engine.kernels.decode_attention import choose_num_splits, paged_decode_attention
from gpu_engine.kernels.prefill_attention import paged_prefill_attention
from gpu_engine.kernels.prefill_tiles import prefill_block_m, prefill_tiles

HEADS = {"Qwen3-0.6B": (16, 8), "Qwen2.5-7B": (28, 4)}
HEAD_DIM = 128
DECODE_BATCHES, DECODE_CONTEXTS = (1, 8, 64, 256), (512, 2048, 8192)
# (sequences, prompt tokens each): up to 64k tokens a call.
PREFILLS = ((1, 512), (1, 2048), (1, 8192), (8, 512), (8, 2048), (8, 8192), (64, 512))
SMOKE = dict(heads={"tiny": (2, 1)}, head_dim=32, batches=(1, 2), contexts=(64,),
             prefills=((1, 32), (2, 32)))  # fmt: skip


def flash_functions() -> tuple[Callable[..., Any], Callable[..., Any]] | None:
    """flash-attn's two entry points, or None where it is not installed."""
    try:
        from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache
    except ImportError:
        return None
    return flash_attn_varlen_func, flash_attn_with_kvcache


class PagedKV:
    """The same keys and values [seqs, ctx, KVH, D] as paged caches of any page size, the
    pages of every sequence in random order."""

    def __init__(self, seqs: int, ctx: int, kv_heads: int, head_dim: int, seed: int) -> None:
        gen = torch.Generator(device=DEV).manual_seed(seed)
        shape = (seqs, ctx, kv_heads, head_dim)
        self.k = torch.randn(shape, device=DEV, dtype=torch.bfloat16, generator=gen)
        self.v = torch.randn(shape, device=DEV, dtype=torch.bfloat16, generator=gen)
        self.seqs, self.ctx = seqs, ctx

    def paged(self, page: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(k_cache, v_cache [blocks, page, KVH, D], block_table [seqs, pages] int32)."""
        per_seq = -(-self.ctx // page)
        blocks = self.seqs * per_seq
        order = torch.randperm(blocks, device=DEV)
        table = order.view(self.seqs, per_seq).to(torch.int32)
        caches = []
        for src in (self.k, self.v):
            padded = torch.zeros(self.seqs, per_seq * page, *src.shape[2:], device=DEV,
                                 dtype=src.dtype)  # fmt: skip
            padded[:, : self.ctx] = src
            cache = torch.empty(blocks, page, *src.shape[2:], device=DEV, dtype=src.dtype)
            cache[order] = padded.view(blocks, page, *src.shape[2:])
            caches.append(cache)
        return caches[0], caches[1], table


def decode_rows(heads: dict[str, tuple[int, int]], head_dim: int, batches: Any,
                contexts: Any) -> Iterator[str]:  # fmt: skip
    """Paged decode: ours (pages of 16 and 256, split-K as the engine chooses) vs
    flash_attn_with_kvcache (pages of 256)."""
    flash = flash_functions()
    sms = torch.cuda.get_device_properties(0).multi_processor_count if DEV == "cuda" else 4
    for name, (hq, hk) in heads.items():
        for bs, ctx in ((b, c) for b in batches for c in contexts):
            kv = PagedKV(bs, ctx, hk, head_dim, seed=bs * 7 + ctx)
            q = torch.randn(bs, hq, head_dim, device=DEV, dtype=torch.bfloat16)
            lens = torch.full((bs,), ctx, device=DEV, dtype=torch.int32)
            scale = head_dim**-0.5
            splits = choose_num_splits(bs, hk, ctx, sms)
            times, outs = {}, {}
            for page in (16, 256):
                kc, vc, table = kv.paged(page)
                run = partial(paged_decode_attention, q, kc, vc, table, lens, scale,
                              num_splits=splits)  # fmt: skip
                outs[f"ours {page}"], times[f"ours {page}"] = timed(run)
            if flash is not None:
                kc, vc, table = kv.paged(256)
                run = partial(_flash_decode, flash[1], q, kc, vc, lens, table, scale)
                outs["flash 256"], times["flash 256"] = timed(run)
            _agree(outs, f"decode {name} {bs}x{ctx}")
            kv_bytes = 2 * kv.k.numel() * kv.k.element_size()
            del kv
            yield _row("decode", name, f"{bs} x {ctx}", times, kv_bytes, "TB/s")


def prefill_rows(heads: dict[str, tuple[int, int]], head_dim: int,
                 prefills: Any) -> Iterator[str]:  # fmt: skip
    """Causal prefill of whole prompts from the paged cache: ours (pages of 16 and 256) vs
    flash_attn_varlen_func with block_table (pages of 256)."""
    flash = flash_functions()
    for name, (hq, hk) in heads.items():
        for seqs, n in prefills:
            kv = PagedKV(seqs, n, hk, head_dim, seed=seqs * 11 + n)
            q = torch.randn(seqs * n, hq, head_dim, device=DEV, dtype=torch.bfloat16)
            cu = torch.arange(0, seqs * n + 1, n, device=DEV, dtype=torch.int32)
            lens = torch.full((seqs,), n, device=DEV, dtype=torch.int32)
            scale = head_dim**-0.5
            times, outs = {}, {}
            # The tile table as the engine stages it (host lists, one copy per step), not
            # rebuilt from cu_seqlens on every call (a device-to-host read).
            block_m = prefill_block_m(q.dtype, n)
            tiles = torch.from_numpy(prefill_tiles(np.full(seqs, n), block_m)).to(DEV)
            for page in (16, 256):
                kc, vc, table = kv.paged(page)
                run = partial(paged_prefill_attention, q, kc, vc, table, cu, lens, n, scale,
                              tiles=tiles, block_m=block_m)  # fmt: skip
                outs[f"ours {page}"], times[f"ours {page}"] = timed(run)
            if flash is not None:
                kc, vc, table = kv.paged(256)
                run = partial(flash[0], q, kc, vc, cu_seqlens_q=cu, cu_seqlens_k=cu,
                              max_seqlen_q=n, max_seqlen_k=n, softmax_scale=scale,
                              causal=True, block_table=table)  # fmt: skip
                outs["flash 256"], times["flash 256"] = timed(run)
            _agree(outs, f"prefill {name} {seqs}x{n}")
            flops = seqs * 4 * head_dim * hq * n * n / 2
            del kv
            yield _row("prefill", name, f"{seqs} x {n}", times, flops, "TFLOP/s")


def timed(run: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float]:
    """(output, median ms) of one kernel call. On CUDA the call is captured in a CUDA graph
    and the replay is timed, as the engine runs attention: what is measured is the device's
    time, not how fast Python launches (a few µs of kernel behind ~15-50 µs of launching
    would time the host)."""
    if DEV != "cuda":
        return run(), bench(run)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()  # compiles; capture needs the kernels loaded
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    graph.replay()
    return out.clone(), bench(graph.replay)


SPLITS = (1, 2, 4, 8, 16, 32)


def split_rows(heads: dict[str, tuple[int, int]], head_dim: int, batches: Any,
               contexts: Any) -> Iterator[str]:  # fmt: skip
    """Our paged decode (pages of 16) at every split count, small batches: what the engine's
    choice (``choose_num_splits``: each split at least 4 tiles of 64 keys) costs where
    flash-attn is ahead (short contexts, few sequences)."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count if DEV == "cuda" else 4
    for name, (hq, hk) in heads.items():
        for bs, ctx in ((b, c) for b in batches for c in contexts):
            kv = PagedKV(bs, ctx, hk, head_dim, seed=bs * 13 + ctx)
            q = torch.randn(bs, hq, head_dim, device=DEV, dtype=torch.bfloat16)
            lens = torch.full((bs,), ctx, device=DEV, dtype=torch.int32)
            kc, vc, table = kv.paged(16)
            chosen = choose_num_splits(bs, hk, ctx, sms)
            cells = []
            for splits in SPLITS:
                run = partial(paged_decode_attention, q, kc, vc, table, lens, head_dim**-0.5,
                              num_splits=splits)  # fmt: skip
                mark = "*" if splits == chosen else ""
                cells.append(f"{timed(run)[1] * 1e3:.1f}{mark}")
            del kv
            yield f"| splits | {name} | {bs} x {ctx} | " + " | ".join(cells) + " |"


def _flash_decode(fn: Callable[..., Any], q: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, lens: torch.Tensor, table: torch.Tensor,
                  scale: float) -> torch.Tensor:  # fmt: skip
    """flash_attn_with_kvcache for one query per sequence, as the engine's backend calls it."""
    out = fn(q.unsqueeze(1), k_cache, v_cache, cache_seqlens=lens, block_table=table,
             softmax_scale=scale, causal=True)  # fmt: skip
    return out.squeeze(1)


def _agree(outs: dict[str, torch.Tensor], what: str) -> None:
    """Every kernel's output within bf16 rounding of the first one's."""
    ref = next(iter(outs.values())).float()
    for label, out in outs.items():
        err = float((out.float() - ref).norm() / ref.norm())
        if err > 2e-2:
            raise AssertionError(f"{what}: {label} differs from the others (rel. err {err:.3g})")


def _row(kind: str, model: str, shape: str, times: dict[str, float], work: float,
         unit: str) -> str:  # fmt: skip
    """| kind | model | shape | ours 16 | ours 256 | flash 256 | flash vs ours 16 |"""
    cells = []
    for label in ("ours 16", "ours 256", "flash 256"):
        ms = times.get(label)
        cells.append("–" if ms is None else f"{ms * 1e3:.1f} ({work / (ms * 1e-3) / 1e12:.2f})")
    ratio = (f"{times['ours 16'] / times['flash 256']:.2f}x" if "flash 256" in times
             else "flash-attn not installed")  # fmt: skip
    return f"| {kind} | {model} | {shape} | " + " | ".join(cells) + f" | {ratio} |"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--parts",
        default="decode,prefill,splits",
        help="comma-separated, run in this order: decode, prefill, splits (ours alone)",
    )
    smoke.add_smoke_flag(ap, "tiny shapes, our kernels only where flash-attn is missing")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    if parts - {"decode", "prefill", "splits"}:
        ap.error(f"--parts: unknown {sorted(parts - {'decode', 'prefill', 'splits'})}")
    if DEV != "cuda" and not args.smoke:
        ap.error("the race needs a CUDA device (use --smoke elsewhere)")
    heads, head_dim = (SMOKE["heads"], SMOKE["head_dim"]) if args.smoke else (HEADS, HEAD_DIM)
    print(f"device {torch.cuda.get_device_name() if DEV == 'cuda' else DEV}; flash-attn "
          f"{'installed' if flash_functions() else 'not installed'}")  # fmt: skip
    print(
        "\n| kernel | model heads | seqs x tokens | ours, pages of 16: us (rate) | ours, pages "
        "of 256 | flash-attn, pages of 256 | ours 16 time / flash time |"
    )
    print("|---|---|---|---|---|---|---|")
    for part in args.parts.split(","):  # in the order given
        if part == "splits":
            cols = " | ".join(f"{n} split(s), µs" for n in SPLITS)
            print(f"\nours alone, * = the engine's choice\n| splits | model heads | seqs x tokens "
                  f"| {cols} |\n|---|---|---|" + "---|" * len(SPLITS))  # fmt: skip
            small = ((1, 2), (64,)) if args.smoke else ((1, 8), (512, 2048))
            rows = split_rows(heads, head_dim, *small)
        elif part == "decode":
            batches = SMOKE["batches"] if args.smoke else DECODE_BATCHES
            contexts = SMOKE["contexts"] if args.smoke else DECODE_CONTEXTS
            rows = decode_rows(heads, head_dim, batches, contexts)
        else:
            rows = prefill_rows(heads, head_dim, SMOKE["prefills"] if args.smoke else PREFILLS)
        for row in rows:
            print(row, flush=True)  # row by row: a cut-off run keeps what it measured
    print("rates: decode K/V read TB/s, prefill TFLOP/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
