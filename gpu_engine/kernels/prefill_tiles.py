"""The query tile table of the paged prefill attention kernel (numpy and torch dtypes only: no
Triton, so the model runner and the CUDA-graph staging import it on any machine).

A step's prefill part is cut into tiles of ``block_m`` query rows, one table row (sequence
index, tile index within the sequence) per tile; the kernel's grid is the table's length.
Rows (-1, 0) are padding: a CUDA graph captures a table sized for the worst case of its token
count (``max_prefill_tiles``) and a step fills what it needs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def prefill_block_m(dtype: torch.dtype, max_query_len: int) -> int:
    """Query rows per tile. Short chunks (chunked prefill mixed with decodes) waste less with
    a 16-row tile; 64 rows use wgmma on Hopper. fp32 (exact dots on CUDA cores) needs small
    tiles to stay in registers."""
    if dtype.itemsize <= 2:
        return 64 if max_query_len > 32 else 16
    return 16


def prefill_tiles(
    query_lens: Sequence[int] | np.ndarray, block_m: int, capacity: int | None = None
) -> np.ndarray:
    """The tile table of a step: int32 [n, 2] rows (sequence index, query tile index) for
    every query tile of every sequence, then rows (-1, 0) up to ``capacity`` (default: no
    padding). ``capacity`` must be at least the number of tiles."""
    q = np.asarray(query_lens, dtype=np.int64)
    per_seq = -(-q // block_m)
    n = int(per_seq.sum())
    size = n if capacity is None else capacity
    if size < n:
        raise ValueError(f"{n} query tiles do not fit a tile table of {size}")
    tiles = np.zeros((size, 2), dtype=np.int32)
    tiles[:n, 0] = np.repeat(np.arange(len(q)), per_seq)
    first = np.repeat(np.cumsum(per_seq) - per_seq, per_seq)
    tiles[:n, 1] = np.arange(n) - first
    tiles[n:, 0] = -1
    return tiles


def max_prefill_tiles(num_tokens: int, num_seqs: int, block_m: int) -> int:
    """Most tiles ``num_tokens`` query tokens in at most ``num_seqs`` sequences can need."""
    return -(-num_tokens // block_m) + min(num_seqs, num_tokens)
