"""Groups of decode sequences that share cached prefix blocks (numpy only, no torch).

Prefix caching gives every sequence whose prompt starts like another's the *same* physical
blocks for the common part (``BlockManager``: one block per content hash). Shared-prefix
attention reads such a prefix once per group and step instead of once per sequence; this
module finds the groups from the block tables the step stages anyway, in a few numpy passes
over the batch (no per-sequence Python):

1. sequences are bucketed by their first block id (equal ids = equal first ``block_size``
   tokens);
2. in each bucket of at least ``min_members``, every member's common prefix with the
   bucket's first sequence is measured in whole blocks, capped so the prefix ends before
   the member's current token; members sharing less than half of the longest such prefix
   leave the group (they attend as usual), and the group's prefix is the shortest of the
   rest;
3. the largest ``max_groups`` buckets are kept; each group's members are cut into tiles of
   ``block_s`` sequences (one program of the prefix kernel per tile and KV head).

A sequence outside every group has ``kv_start`` 0 and attends to its whole context alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_GROUPS = 4


@dataclass
class PrefixGroups:
    """One step's grouping (``n`` decode sequences, ``g`` groups, ``t`` tiles)."""

    kv_start: np.ndarray  # [n] int32: prefix tokens a sequence's group attends for it
    tile_group: np.ndarray  # [t] int32: the group of each tile
    tile_members: np.ndarray  # [t, block_s] int32: batch rows of its members, -1 = none
    group_blocks: list[np.ndarray]  # [g] int32 arrays: each group's prefix block ids
    shared_tokens: int  # prefix tokens read once per group instead of once per member


def find_prefix_groups(
    tables: np.ndarray,
    rows: np.ndarray,
    positions: np.ndarray,
    block_size: int,
    block_s: int,
    max_groups: int = MAX_GROUPS,
    min_members: int = 2,
) -> PrefixGroups | None:
    """Groups of the batch whose block tables are ``tables[rows]`` ([R, W] int32) and whose
    current tokens sit at ``positions`` ([n]); None when no group forms."""
    n = len(rows)
    caps = positions // block_size  # whole blocks strictly before the current token
    eligible = np.flatnonzero(caps >= 1)
    if n < min_members or len(eligible) < min_members:
        return None
    first = tables[rows[eligible], 0]
    _, inverse, counts = np.unique(first, return_inverse=True, return_counts=True)
    big = np.flatnonzero(counts >= min_members)
    if not len(big):
        return None
    kv_start = np.zeros(n, dtype=np.int32)
    tile_group: list[int] = []
    tile_rows: list[np.ndarray] = []
    group_blocks: list[np.ndarray] = []
    shared = 0
    for bucket in big[np.argsort(-counts[big], kind="stable")][:max_groups]:
        members = eligible[inverse == bucket]
        cap = caps[members]
        t = tables[rows[members], : int(cap.max())]
        differ = t != t[0]
        # Leading equal blocks: the first differing column, or the whole width.
        same = np.where(differ.any(axis=1), differ.argmax(axis=1), t.shape[1])
        lcp = np.minimum(same, cap)
        keep = lcp >= max(1, int(lcp.max()) // 2)
        if keep.sum() < min_members:
            continue
        members = members[keep]
        prefix = int(lcp[keep].min())
        kv_start[members] = prefix * block_size
        group = len(group_blocks)
        group_blocks.append(t[0, :prefix].astype(np.int32))
        shared += (len(members) - 1) * prefix * block_size
        tiles = np.full(-(-len(members) // block_s) * block_s, -1, dtype=np.int32)
        tiles[: len(members)] = members
        tile_rows.append(tiles.reshape(-1, block_s))
        tile_group.extend([group] * len(tile_rows[-1]))
    if not group_blocks:
        return None
    return PrefixGroups(
        kv_start=kv_start,
        tile_group=np.asarray(tile_group, dtype=np.int32),
        tile_members=np.concatenate(tile_rows),
        group_blocks=group_blocks,
        shared_tokens=shared,
    )


def max_prefix_tiles(max_seqs: int, block_s: int, max_groups: int = MAX_GROUPS) -> int:
    """Most tiles a grouping of at most ``max_seqs`` sequences can need."""
    return -(-max_seqs // block_s) + max_groups


def prefix_block_s(group: int) -> int:
    """Members per tile: rows = members x the GQA group padded to a power of two, 64 rows (a
    Hopper wgmma tile) where the group allows."""
    return max(1, 64 // (1 << (group - 1).bit_length()))
