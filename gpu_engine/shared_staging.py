"""Static device buffers for shared-prefix attention in captured decode graphs, and their
staging from a step's ``PrefixGroups``.

One int32 device buffer holds, at fixed offsets, ``kv_start`` [max_seqs] | tile groups [T] |
tile members [T, block_s] | group prefix lengths [G] | group block tables [G, W]; the graphs
read views of it (``shared(bs)``). ``stage`` fills one of two pinned host copies (used in
turn, as the decode staging does) and copies it in asynchronously. A step without groups
stages nothing: it replays the plain graphs.
"""

from __future__ import annotations

import torch

from gpu_engine.layers.base import SharedPrefix
from gpu_engine.prefix_groups import MAX_GROUPS, PrefixGroups, max_prefix_tiles


class SharedPrefixStaging:
    """Fixed-capacity shared-prefix metadata for up to ``max_seqs`` decode rows."""

    def __init__(self, max_seqs: int, max_blocks: int, block_s: int, device: torch.device) -> None:
        self.block_s, self.max_blocks = block_s, max_blocks
        t = self.num_tiles = max_prefix_tiles(max_seqs, block_s)
        g = MAX_GROUPS
        self._tiles = max_seqs
        self._members = self._tiles + t
        self._lens = self._members + t * block_s
        self._tables = self._lens + g
        size = self._tables + g * max_blocks
        self._dev = torch.zeros(size, dtype=torch.int32, device=device)
        self._dev[self._tiles : self._lens] = -1  # no tiles, no members
        pin = device.type == "cuda"
        self._host = [torch.zeros(size, dtype=torch.int32, pin_memory=pin) for _ in range(2)]
        self._turn = 0
        self.num_staged = 0
        self.shared_tokens = 0  # prefix tokens read once per group instead of per member

    def shared(self, num_seqs: int) -> SharedPrefix:
        """Views for a graph of ``num_seqs`` decode rows (the capacities stay fixed)."""
        d, t = self._dev, self.num_tiles
        return SharedPrefix(
            kv_start=d[:num_seqs],
            tile_group=d[self._tiles : self._members],
            tile_members=d[self._members : self._lens].view(t, self.block_s),
            group_tables=d[self._tables :].view(MAX_GROUPS, self.max_blocks),
            group_lens=d[self._lens : self._tables],
        )

    def stage(self, groups: PrefixGroups, num_seqs: int, block_size: int) -> None:
        """Write this step's grouping of ``num_seqs`` rows (padding rows: no group) and
        copy it to the device in stream order."""
        self._turn ^= 1
        host = self._host[self._turn]
        h = host.numpy()
        h[: self._tiles] = 0
        h[:num_seqs] = groups.kv_start
        n_tiles = len(groups.tile_group)
        h[self._tiles : self._lens] = -1
        h[self._tiles : self._tiles + n_tiles] = groups.tile_group
        members = h[self._members : self._lens].reshape(self.num_tiles, self.block_s)
        members[:n_tiles] = groups.tile_members
        lens = h[self._lens : self._tables]
        lens[:] = 0
        tables = h[self._tables :].reshape(MAX_GROUPS, self.max_blocks)
        for g, blocks in enumerate(groups.group_blocks):
            lens[g] = len(blocks) * block_size
            tables[g, : len(blocks)] = blocks
        self._dev.copy_(host, non_blocking=True)
        self.num_staged += 1
        self.shared_tokens += groups.shared_tokens
