"""Block manager: ref counts, prefix caching (chained hashes, verification, LRU), growth, waste.

Pure Python: these tests never import torch (see test_no_torch.py for the import check).
"""

from __future__ import annotations

import pytest

from gpu_engine.block_manager import BlockAllocationError, BlockManager
from gpu_engine.sequence import SamplingParams, Sequence, pending_token

BS = 4


def seq(rid: str, tokens: list[int]) -> Sequence:
    return Sequence(rid, tokens, SamplingParams())


def computed(bm: BlockManager, s: Sequence) -> None:
    """Pretend a step computed every token of ``s`` (the scheduler registers at scheduling)."""
    bm.cache_blocks(s, s.num_tokens)
    s.num_computed_tokens = s.num_tokens


def test_allocate_and_free_return_ref_counts_to_zero() -> None:
    bm = BlockManager(8, BS)
    a, b = seq("a", list(range(10))), seq("b", list(range(100, 105)))
    assert bm.can_allocate(a) and bm.allocate(a) == 0
    assert len(a.block_table) == 3 and bm.num_free_blocks == 5
    bm.allocate(b)
    bm.check_invariants([a, b])
    bm.free(a)
    bm.free(b)
    bm.check_invariants([])
    assert bm.num_free_blocks == 8
    assert all(block.ref_count == 0 for block in bm.blocks)


def test_prefix_hit_only_after_blocks_are_scheduled() -> None:
    bm = BlockManager(16, BS)
    prompt = list(range(13))  # 3 full blocks + 1 token
    a = seq("a", prompt)
    bm.allocate(a)
    b = seq("b", [*prompt, 99])
    assert bm.allocate(b) == 0, "a's blocks are not scheduled yet: no hit may be served"
    bm.free(b)
    computed(bm, a)
    c = seq("c", [*prompt[:12], 7, 8])
    assert bm.allocate(c) == 12
    assert c.block_table[:3] == a.block_table[:3]
    assert c.num_computed_tokens == 12
    assert all(bm.blocks[i].ref_count == 2 for i in a.block_table[:3])
    assert bm.prefix_hit_tokens == 12
    bm.check_invariants([a, c])


def test_only_computed_full_blocks_are_registered() -> None:
    bm = BlockManager(16, BS)
    a = seq("a", list(range(13)))
    bm.allocate(a)
    bm.cache_blocks(a, 7)  # a chunk covering one full block and part of the next
    a.num_computed_tokens = 7
    assert bm.num_cached_blocks == 1
    bm.free(a)  # e.g. aborted mid-prefill: only the computed block may be served later
    assert bm.allocate(seq("b", list(range(13)))) == 4


def test_blocks_holding_a_pending_token_are_registered_once_it_lands() -> None:
    """A placeholder of a token still being sampled (asynchronous scheduling) is never
    hashed: the block it completes is registered by a later call, with the real token."""
    bm = BlockManager(16, BS)
    a = seq("a", list(range(7)))
    bm.allocate(a)
    computed(bm, a)
    a.token_ids.append(pending_token(0))  # the 8th token, completing block 2
    a.num_pending = 1
    bm.try_append(a, cache=True)
    assert bm.num_cached_blocks == 1
    a.token_ids[-1], a.num_pending = 50, 0  # the token landed
    a.token_ids += [51, 52, 53, 54]
    bm.try_append(a, cache=True)  # block 3 fills: blocks 2 and 3 are registered now
    assert bm.num_cached_blocks == 3
    b = seq("b", [*range(7), 50, 51, 52, 53, 54, 9])
    assert bm.allocate(b) == 12


def test_last_token_is_never_a_hit() -> None:
    bm = BlockManager(16, BS)
    a = seq("a", list(range(8)))  # exactly two full blocks
    bm.allocate(a)
    computed(bm, a)
    b = seq("b", list(range(8)))
    # All 8 tokens are cached, but the last one must be recomputed for its logits.
    assert bm.allocate(b) == 4
    assert b.block_table[0] == a.block_table[0] and b.block_table[1] != a.block_table[1]


def test_chain_hash_depends_on_the_whole_prefix() -> None:
    bm = BlockManager(16, BS)
    a = seq("a", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    bm.allocate(a)
    computed(bm, a)
    # Same second block, different first block: no hit at all.
    b = seq("b", [0, 2, 3, 4, 5, 6, 7, 8, 9])
    assert bm.allocate(b) == 0


def test_hash_collision_is_caught_by_token_verification() -> None:
    bm = BlockManager(16, BS)
    a = seq("a", [1, 2, 3, 4, 5])
    bm.allocate(a)
    computed(bm, a)
    # Simulate a colliding hash: the registered block's stored tokens differ from ours.
    block = bm.blocks[a.block_table[0]]
    block.token_ids = (9, 9, 9, 9)
    b = seq("b", [1, 2, 3, 4, 5])
    assert bm.allocate(b) == 0


def test_freed_cached_blocks_are_reused_then_evicted_lru() -> None:
    bm = BlockManager(4, BS)
    a = seq("a", [1, 2, 3, 4, 9])
    bm.allocate(a)
    computed(bm, a)
    bm.free(a)
    assert bm.num_free_blocks == 4 and bm.num_cached_blocks == 1
    # Revived from the free list by a later request with the same prefix.
    b = seq("b", [1, 2, 3, 4, 10])
    assert bm.allocate(b) == 4
    bm.free(b)
    # A request needing every block evicts the cached one (its content is gone afterwards).
    c = seq("c", list(range(50, 66)))
    assert bm.can_allocate(c)
    bm.allocate(c)
    assert bm.num_evictions == 1 and bm.num_cached_blocks == 0
    bm.free(c)
    d = seq("d", [1, 2, 3, 4, 11])
    assert bm.allocate(d) == 0


def test_lru_evicts_least_recently_freed_first() -> None:
    bm = BlockManager(5, BS)
    old, new = seq("old", [1, 1, 1, 1, 0]), seq("new", [2, 2, 2, 2, 0])
    for s in (old, new):
        bm.allocate(s)
        computed(bm, s)
    bm.free(old)  # released first -> least recently used
    bm.free(new)
    filler = seq("f", [3] * 16)  # 3 plain blocks + 1 evicted cached block
    bm.allocate(filler)
    assert bm.num_evictions == 1
    bm.free(filler)
    assert bm.allocate(seq("old2", [1, 1, 1, 1, 5])) == 0  # evicted
    assert bm.allocate(seq("new2", [2, 2, 2, 2, 5])) == 4  # survived


def test_can_allocate_counts_revived_blocks() -> None:
    bm = BlockManager(3, BS)
    a = seq("a", [1, 2, 3, 4, 5, 6, 7, 8, 9])  # 3 blocks
    bm.allocate(a)
    computed(bm, a)
    bm.free(a)
    # Needs 3 blocks: 2 revived hits + 1 new; all 3 are "free" (2 of them cached).
    b = seq("b", [1, 2, 3, 4, 5, 6, 7, 8, 0])
    assert bm.can_allocate(b)
    assert not bm.can_allocate(b, reserve_blocks=1)
    assert bm.allocate(b) == 8
    bm.check_invariants([b])


def test_append_on_block_boundary_and_errors() -> None:
    bm = BlockManager(2, BS)
    a = seq("a", [1, 2, 3, 4])
    bm.allocate(a)
    assert bm.blocks_needed_to_append(a) == 0
    a.append_token(5)
    assert bm.blocks_needed_to_append(a) == 1 and bm.can_append(a)
    bm.append(a)
    assert len(a.block_table) == 2
    for t in (6, 7, 8, 9):
        a.append_token(t)
    assert not bm.can_append(a)
    with pytest.raises(BlockAllocationError):
        bm.append(a)
    with pytest.raises(BlockAllocationError):
        bm.allocate(a)  # already holds blocks


def test_paging_waste_reports_unused_slots() -> None:
    bm = BlockManager(8, BS)
    a, b = seq("a", [1, 2, 3, 4, 5]), seq("b", [1, 2, 3, 4])
    bm.allocate(a)
    bm.allocate(b)
    assert bm.paging_waste([a, b]) == (3, 12)


def test_prefix_caching_disabled_never_hits() -> None:
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    a = seq("a", [1, 2, 3, 4, 5])
    bm.allocate(a)
    computed(bm, a)
    assert bm.allocate(seq("b", [1, 2, 3, 4, 5])) == 0
    assert bm.num_cached_blocks == 0
