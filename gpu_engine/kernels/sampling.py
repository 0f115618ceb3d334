"""Keyed sampling: a step's tokens in one launch, with random draws that need no generator.

Each row carries a 64-bit key (``gpu_engine.sampling`` derives it from the request's seed
and how many tokens it has drawn, or from the engine's seed and a step counter). The uniform
draw of token ``v`` is Philox(key, v), so a row's draws are the same whatever else shares
the batch, and drawing them costs nothing on the host (a ``torch.Generator`` per seeded row
costs one launch per row per step).

``sample_keyed`` fuses what the torch sampler does in a dozen launches: the grammar bitmask,
temperature, the exponential race (``argmax(l / T - log E)``, E = -log U, the same pick as
``argmax(softmax(l / T) / E)``) and greedy rows' argmax. ``exponential_keyed`` writes the
same E as a tensor for the torch path (top-k / top-p / min_p rows), so both paths pick the
same token from the same key.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gpu_engine.kernels import INTERPRET

BLOCK_V = 2048  # vocabulary tile of one iteration
# Grammar-mask words read at once (checking which rows are constrained).
WORD_BLOCK: tl.constexpr = tl.constexpr(1024)


@triton.jit
def _cleared_words(mask_ptr, stride_m, rows, row_ok, mask_words, WORD_BLOCK: tl.constexpr):
    """[ROWS, 1]: how many words of each row's grammar mask clear a bit (a row without a
    grammar is all ones: 0)."""
    clear = tl.zeros_like(rows)
    for start in range(0, mask_words, WORD_BLOCK):
        words = start + tl.arange(0, WORD_BLOCK)[None, :]
        inside = row_ok & (words < mask_words)
        w = tl.load(mask_ptr + rows * stride_m + words, mask=inside, other=-1)
        clear += tl.sum((w != -1).to(tl.int64), axis=1)[:, None]
    return clear


# Sizes and strides are not specialized on: one compiled variant per dtype and flags serves
# every batch, so the warm-up at load (``Sampler.warm_up``) compiles all a server needs.
@triton.jit(do_not_specialize=["stride_l", "n_rows", "vocab", "stride_m", "mask_words"])
def _sample_keyed_kernel(
    logits_ptr,
    stride_l,
    n_rows,
    vocab,
    keys_ptr,
    temperature_ptr,
    greedy_ptr,
    mask_ptr,
    stride_m,
    mask_words,
    out_ptr,
    RANDOM: tl.constexpr,
    MASKED: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # ROWS rows per program: 1 on the GPU; many under the interpreter, whose cost is per
    # program and per call.
    row_ids = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = (row_ids < n_rows)[:, None]
    rows = row_ids.to(tl.int64)[:, None]  # [ROWS, 1]
    if RANDOM:
        key = tl.broadcast_to(tl.load(keys_ptr + rows, mask=row_ok, other=0), (ROWS, BLOCK))
        greedy = tl.load(greedy_ptr + rows, mask=row_ok, other=0) != 0
        inv_t = 1.0 / tl.load(temperature_ptr + rows, mask=row_ok, other=1.0)
    if MASKED:
        # Ids past the mask (a padded vocabulary) are allowed only on unconstrained rows.
        tail_allowed = _cleared_words(mask_ptr, stride_m, rows, row_ok, mask_words, WORD_BLOCK) == 0
    best = tl.full((ROWS,), -float("inf"), tl.float32)
    best_idx = tl.zeros((ROWS,), tl.int32)
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)[None, :]  # [1, BLOCK]
        inside = row_ok & (cols < vocab)
        score = tl.load(logits_ptr + rows * stride_l + cols, mask=inside, other=-float("inf"))
        score = score.to(tl.float32)
        if MASKED:
            in_mask = cols < mask_words * 32
            word = tl.load(mask_ptr + rows * stride_m + cols // 32, mask=inside & in_mask, other=-1)
            allowed = tl.where(in_mask, ((word >> (cols % 32)) & 1) != 0, tail_allowed)
            score = tl.where(allowed, score, -float("inf"))
        if RANDOM:
            u = tl.rand(key, tl.broadcast_to(cols, (ROWS, BLOCK)))
            race = score * inv_t - tl.log(-tl.log(u))
            score = tl.where(greedy, score, race)
        block_best = tl.max(score, axis=1)
        block_idx = start + tl.argmax(score, axis=1)
        better = block_best > best
        best_idx = tl.where(better, block_idx, best_idx)
        best = tl.where(better, block_best, best)
    tl.store(out_ptr + row_ids, best_idx.to(tl.int64), mask=row_ids < n_rows)


@triton.jit(do_not_specialize=["stride_o", "n_rows", "vocab"])
def _exponential_keyed_kernel(
    keys_ptr, out_ptr, stride_o, n_rows, vocab, ROWS: tl.constexpr, BLOCK: tl.constexpr
):
    row_ids = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = (row_ids < n_rows)[:, None]
    rows = row_ids.to(tl.int64)[:, None]
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)[None, :]
    key = tl.broadcast_to(tl.load(keys_ptr + rows, mask=row_ok, other=0), (ROWS, BLOCK))
    u = tl.rand(key, tl.broadcast_to(cols, (ROWS, BLOCK)))
    tl.store(out_ptr + rows * stride_o + cols, -tl.log(u), mask=row_ok & (cols < vocab))


def _rows_per_program(rows: int, block: int) -> int:
    """1 on the GPU (a row per program: parallel enough, one reduction per row); under the
    interpreter as many as keep a tile (a vocabulary block or the mask words read at once)
    near 64k values."""
    if not INTERPRET:
        return 1
    return max(1, min(triton.next_power_of_2(rows), (1 << 16) // max(block, WORD_BLOCK.value)))


def sample_keyed(
    logits: torch.Tensor,
    keys: torch.Tensor | None,
    temperature: torch.Tensor | None,
    greedy: torch.Tensor | None,
    bitmask: torch.Tensor | None,
) -> torch.Tensor:
    """One token per row of ``logits`` [N, vocab] (any float dtype, rows contiguous):
    ``keys`` [N] int64, ``temperature`` [N] float32 and ``greedy`` [N] bool for random
    rows (all None: every row greedy); ``bitmask`` [N, words] int32, the grammar mask (bit
    ``t % 32`` of word ``t // 32`` allows token ``t``) or None. Returns [N] int64."""
    rows, vocab = logits.shape
    if logits.stride(1) != 1:
        raise ValueError("logits rows must be contiguous")
    random = keys is not None
    if random and (temperature is None or greedy is None):
        raise ValueError("random rows need keys, temperature and greedy together")
    if bitmask is not None and (bitmask.dtype != torch.int32 or bitmask.shape[0] != rows):
        raise ValueError(f"bitmask {tuple(bitmask.shape)} {bitmask.dtype} for {rows} rows")
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows == 0:
        return out
    mask = bitmask if bitmask is not None else out  # an unused placeholder when None
    block = min(BLOCK_V, triton.next_power_of_2(vocab))
    per_program = _rows_per_program(rows, block)
    _sample_keyed_kernel[(triton.cdiv(rows, per_program),)](
        logits,
        logits.stride(0),
        rows,
        vocab,
        keys if random else out,
        temperature if random else out,
        greedy if random else out,
        mask,
        mask.stride(0) if bitmask is not None else 0,
        bitmask.shape[1] if bitmask is not None else 0,
        out,
        RANDOM=random,
        MASKED=bitmask is not None,
        ROWS=per_program,
        BLOCK=block,
        num_warps=8,
    )
    return out


def exponential_keyed(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """[N, vocab] float32 Exp(1) draws, row ``i`` from ``keys[i]``: the E that
    ``sample_keyed`` races with (-log U of the same U)."""
    rows = keys.shape[0]
    out = torch.empty(rows, vocab, dtype=torch.float32, device=keys.device)
    if rows:
        block = min(BLOCK_V, triton.next_power_of_2(vocab))
        per_program = _rows_per_program(rows, block)
        grid = (triton.cdiv(rows, per_program), triton.cdiv(vocab, block))
        _exponential_keyed_kernel[grid](
            keys, out, out.stride(0), rows, vocab, ROWS=per_program, BLOCK=block, num_warps=4
        )
    return out
