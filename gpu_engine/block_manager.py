"""Paged KV-cache bookkeeping: ref-counted fixed-size blocks with prefix caching (no torch).

A block holds ``block_size`` consecutive tokens of one or more sequences. A *full* block whose
K/V has been computed is registered under a chained content hash (hash of the parent block's
hash and this block's tokens), so a later sequence with the same prefix reuses it instead of
recomputing. Hits are verified against the stored tokens and parent hash. Blocks whose ref
count drops to zero keep their content and stay findable until a new allocation evicts them,
least recently used first.

Every side-effecting call has a ``can_*`` check: ``can_allocate``/``allocate`` admit a
sequence (blocks for all its current tokens), ``can_append``/``append`` grow it by the block
its next token needs. A block's hash is registered by ``cache_blocks`` when the scheduler
commits a step that computes the block's last token: every backend stores a step's K/V before
any query of that step reads the cache (``gpu_engine.layers.base``), so a request admitted in
the same step can already share it, while the blocks of later chunks stay unregistered until
their chunk is scheduled (an abort mid-prefill never leaves an uncomputed block findable).
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import repeat
from operator import attrgetter, sub

from gpu_engine.errors import EngineError
from gpu_engine.sequence import Sequence

_ROOT_HASH = 0
_HASH_MEMO_ENTRIES = 65_536  # ~15 MB at 16-token blocks


class BlockAllocationError(EngineError):
    """A block-manager call was made without its ``can_*`` check succeeding (a bug)."""


def chain_hash(parent_hash: int, token_ids: Iterable[int]) -> int:
    """128-bit content hash of one block given its parent's hash (deterministic across runs)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent_hash.to_bytes(16, "little"))
    ids = token_ids if isinstance(token_ids, list | tuple) else list(token_ids)
    h.update(struct.pack(f"<{len(ids)}i", *ids))  # int32 little-endian each (ints only)
    return int.from_bytes(h.digest(), "little")


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None  # set once registered in the prefix cache
    parent_hash: int = _ROOT_HASH
    token_ids: tuple[int, ...] = ()


class BlockManager:
    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise EngineError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks without cached content: handed out first.
        self._free_plain: deque[int] = deque(range(num_blocks))
        # Free blocks with cached content, least recently used first (evicted in that order).
        self._free_cached: OrderedDict[int, None] = OrderedDict()
        self._hash_to_block: dict[int, int] = {}
        # request id -> leading blocks of that sequence already offered to the cache, so a
        # decode step looks at its new full block only (not all ~100 blocks of a long
        # sequence: that scan was ~1.5 ms per step at 256 sequences).
        self._registered: dict[str, int] = {}
        # (parent hash, block tokens...) -> chain hash, for blocks many sequences share.
        self._hash_memo: dict[tuple[int, ...], int] = {}
        # Counters for stats().
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0
        self.num_evictions = 0

    # -- queries -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks with ref count 0 (cached-but-unused ones included: they are evictable)."""
        return len(self._free_plain) + len(self._free_cached)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._hash_to_block)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _seq_block_hashes(self, seq: Sequence, num_full_blocks: int) -> list[int]:
        """Chained hashes of the sequence's first ``num_full_blocks`` full blocks (memoised
        per sequence, and per block content across sequences: requests sharing a system
        prompt hash its blocks once, not once each)."""
        bs = self.block_size
        hashes = seq.block_hashes
        memo = self._hash_memo
        while len(hashes) < num_full_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else _ROOT_HASH
            key = (parent, *seq.token_ids[i * bs : (i + 1) * bs])
            h = memo.get(key)
            if h is None:
                if len(memo) >= _HASH_MEMO_ENTRIES:
                    memo.clear()  # bounded: the next requests rebuild what they share
                h = memo[key] = chain_hash(parent, key[1:])
            hashes.append(h)
        return hashes[:num_full_blocks]

    def _match_prefix(self, seq: Sequence) -> list[int]:
        """Block ids of the longest cached prefix. The last token is never a hit: its logits
        are needed, so at least one token is always computed."""
        if not self.enable_prefix_caching:
            return []
        bs = self.block_size
        hashes = self._seq_block_hashes(seq, (seq.num_tokens - 1) // bs)
        hits: list[int] = []
        parent = _ROOT_HASH
        for i, h in enumerate(hashes):
            block_id = self._hash_to_block.get(h)
            if block_id is None:
                break
            block = self.blocks[block_id]
            if (
                block.parent_hash != parent
                or list(block.token_ids) != seq.token_ids[i * bs : (i + 1) * bs]
            ):
                break  # hash collision: never serve foreign K/V
            hits.append(block_id)
            parent = h
        return hits

    # -- admission -----------------------------------------------------------------------
    def can_allocate(self, seq: Sequence, reserve_blocks: int = 0) -> bool:
        """Whether blocks for all of ``seq``'s current tokens fit, keeping ``reserve_blocks``
        free afterwards."""
        return self._fits(seq, self._match_prefix(seq), reserve_blocks)

    def _fits(self, seq: Sequence, hits: list[int], reserve_blocks: int) -> bool:
        revived = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        new = self.blocks_for(seq.num_tokens) - len(hits)
        return new + revived + reserve_blocks <= self.num_free_blocks

    def try_allocate(self, seq: Sequence, reserve_blocks: int = 0) -> int | None:
        """``allocate(seq)`` if ``can_allocate(seq, reserve_blocks)``, matching the prefix
        once (the admission path: one match per admitted prompt instead of three); None if
        it does not fit."""
        if seq.block_table:
            raise BlockAllocationError(f"sequence {seq.request_id} already holds blocks")
        hits = self._match_prefix(seq)
        if not self._fits(seq, hits, reserve_blocks):
            return None
        return self._allocate(seq, hits)

    def allocate(self, seq: Sequence) -> int:
        """Give ``seq`` blocks for all its tokens; returns the number of prefix-hit tokens
        (also set as ``seq.num_computed_tokens``)."""
        cached = self.try_allocate(seq)
        if cached is None:
            raise BlockAllocationError(f"not enough free blocks for {seq.request_id}")
        return cached

    def _allocate(self, seq: Sequence, hits: list[int]) -> int:
        for block_id in hits:  # pin hits first so new allocations cannot evict them
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free_cached[block_id]
            block.ref_count += 1
        table = list(hits)
        for _ in range(self.blocks_for(seq.num_tokens) - len(hits)):
            table.append(self._take_free_block())
        seq.block_table = table
        num_hit_tokens = len(hits) * self.block_size
        seq.num_computed_tokens = num_hit_tokens
        self.prefix_query_tokens += seq.num_tokens
        self.prefix_hit_tokens += num_hit_tokens
        return num_hit_tokens

    def _take_free_block(self) -> int:
        if self._free_plain:
            block_id = self._free_plain.popleft()
        elif self._free_cached:
            block_id, _ = self._free_cached.popitem(last=False)  # evict least recently used
            self._uncache(self.blocks[block_id])
            self.num_evictions += 1
        else:
            raise BlockAllocationError("no free KV blocks")
        block = self.blocks[block_id]
        block.ref_count = 1
        return block_id

    def _uncache(self, block: Block) -> None:
        if block.hash is not None and self._hash_to_block.get(block.hash) == block.block_id:
            del self._hash_to_block[block.hash]
        block.hash = None
        block.parent_hash = _ROOT_HASH
        block.token_ids = ()

    # -- growth --------------------------------------------------------------------------
    def blocks_needed_to_append(self, seq: Sequence) -> int:
        """New blocks needed so the cache can hold all of ``seq``'s tokens (0 or more)."""
        return max(0, self.blocks_for(seq.num_tokens) - len(seq.block_table))

    def can_append(self, seq: Sequence) -> bool:
        return self.blocks_needed_to_append(seq) <= self.num_free_blocks

    def try_append(self, seq: Sequence, cache: bool = False) -> bool:
        """``append(seq)`` if ``can_append(seq)``; whether it did. With ``cache``, a
        successful append is followed by ``cache_blocks(seq, seq.num_tokens)``. One call on
        the decode path, which runs for every running sequence each step."""
        table = seq.block_table
        num_tokens = len(seq.token_ids)
        need = -(-num_tokens // self.block_size) - len(table)
        if need > 0:
            if need > len(self._free_plain) + len(self._free_cached):
                return False
            for _ in range(need):
                table.append(self._take_free_block())
        if (
            cache
            and self.enable_prefix_caching
            and num_tokens // self.block_size > self._registered.get(seq.request_id, 0)
        ):
            self.cache_blocks(seq, num_tokens)
        return True

    def append(self, seq: Sequence) -> None:
        if not self.can_append(seq):
            raise BlockAllocationError(f"not enough free blocks to grow {seq.request_id}")
        for _ in range(self.blocks_needed_to_append(seq)):
            seq.block_table.append(self._take_free_block())

    # -- after a step --------------------------------------------------------------------
    def cache_blocks(self, seq: Sequence, num_tokens: int) -> None:
        """Register ``seq``'s full blocks within its first ``num_tokens`` tokens in the prefix
        cache. Call with the tokens computed by the end of the step being scheduled."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        # Placeholders of tokens still being sampled are never hashed: a block holding one
        # is registered by a later call, once its tokens are known.
        num_tokens = min(num_tokens, len(seq.token_ids) - seq.num_pending)
        num_full = min(num_tokens // bs, len(seq.block_table))
        start = self._registered.get(seq.request_id, 0)
        if num_full <= start:
            return
        hashes = self._seq_block_hashes(seq, num_full)
        for i in range(start, num_full):
            h = hashes[i]
            block = self.blocks[seq.block_table[i]]
            if block.hash is None and h not in self._hash_to_block:
                block.hash = h
                block.parent_hash = hashes[i - 1] if i else _ROOT_HASH
                block.token_ids = tuple(seq.token_ids[i * bs : (i + 1) * bs])
                self._hash_to_block[h] = block.block_id
        self._registered[seq.request_id] = num_full

    # -- release -------------------------------------------------------------------------
    def free(self, seq: Sequence) -> None:
        """Drop ``seq``'s references. Released in reverse so a prefix's tail is evicted
        before its head (the head is the part most likely to be shared again)."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            if block.ref_count <= 0:
                raise BlockAllocationError(f"block {block_id} freed twice")
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.hash is not None:
                    self._free_cached[block_id] = None
                else:
                    self._free_plain.append(block_id)
        seq.block_table = []
        seq.num_computed_tokens = 0
        self._registered.pop(seq.request_id, None)

    # -- reporting -----------------------------------------------------------------------
    def paging_waste(self, seqs: Iterable[Sequence]) -> tuple[int, int]:
        """(unused token slots in blocks held by ``seqs``, all slots they hold)."""
        # sum over seqs of max(0, held - num_tokens), in C-level maps: runs every step.
        seqs = list(seqs)
        held = [len(t) * self.block_size for t in map(attrgetter("block_table"), seqs)]
        num_tokens = map(len, map(attrgetter("token_ids"), seqs))
        waste = sum(map(max, repeat(0), map(sub, held, num_tokens)))
        return waste, sum(held)

    def check_invariants(self, live: Iterable[Sequence]) -> None:
        """Ref counts equal references from ``live`` sequences; free lists are consistent."""
        refs = [0] * self.num_blocks
        for seq in live:
            for block_id in seq.block_table:
                refs[block_id] += 1
        free = set(self._free_plain) | set(self._free_cached)
        if len(free) != len(self._free_plain) + len(self._free_cached):
            raise EngineError("a block is on both free lists")
        for block in self.blocks:
            if block.ref_count != refs[block.block_id]:
                raise EngineError(
                    f"block {block.block_id}: ref {block.ref_count} != {refs[block.block_id]}"
                )
            if (block.ref_count == 0) != (block.block_id in free):
                raise EngineError(f"block {block.block_id} free-list state is wrong")
        for h, block_id in self._hash_to_block.items():
            if self.blocks[block_id].hash != h:
                raise EngineError(f"hash table points at block {block_id} with another hash")
