"""The CUDA-graph decode staging on CPU: what ``DecodeGraphs.stage_and_run`` writes into its
host buffers (token ids, positions, slots, lengths, block tables) equals the direct
computation from the sequences, step after step, while block tables grow across block
boundaries, the batch shrinks and reorders, a sequence is preempted (a new table list),
a request id is reused and the table mirror overflows and is rebuilt."""

from __future__ import annotations

import random

import torch

from gpu_engine.cuda_graphs import DecodeGraphs
from gpu_engine.sequence import SamplingParams, Sequence

BLOCK = 4
MAX_SEQS = 8
MAX_LEN = 64


class _NoReplay:
    def __init__(self) -> None:
        self.calls = 0

    def replay(self) -> None:
        self.calls += 1


def _graphs() -> DecodeGraphs:
    graphs = DecodeGraphs(
        torch.nn.Identity(), MAX_SEQS, MAX_LEN, BLOCK, 8, torch.float32, torch.device("cpu")
    )
    graphs.graphs = {bs: _NoReplay() for bs in graphs.batch_sizes}  # type: ignore[misc]
    return graphs


def _check(graphs: DecodeGraphs, seqs: list[Sequence]) -> None:
    n = len(seqs)
    bs = next(b for b in graphs.batch_sizes if b >= n)
    m, w = graphs._max_bs, graphs._max_blocks
    h64, h32 = (t.numpy() for t in graphs._staging.last)
    rows = h32[m:].reshape(m, w)
    for i, seq in enumerate(seqs):
        p = seq.num_computed_tokens
        assert h64[i] == seq.token_ids[p]
        assert h64[m + i] == p
        assert h64[2 * m + i] == seq.block_table[p // BLOCK] * BLOCK + p % BLOCK
        assert h32[i] == p + 1
        assert list(rows[i, : len(seq.block_table)]) == seq.block_table
    assert (h64[2 * m + n : 2 * m + bs] == -1).all()
    assert (h32[n:bs] == 0).all()


def _decode_ready(seq: Sequence, next_block: list[int]) -> None:
    """Append a token and, when it needs one, a block (what postprocess + schedule do)."""
    seq.token_ids.append(len(seq.token_ids) % 50)
    seq.num_computed_tokens = len(seq.token_ids) - 1
    if len(seq.block_table) * BLOCK < len(seq.token_ids):
        seq.block_table.append(next_block[0])
        next_block[0] += 1


def test_staged_buffers_match_direct_computation() -> None:
    rng = random.Random(0)
    graphs = _graphs()
    next_block = [0]
    ids = iter(range(10_000))

    def new_seq(request_id: str | None = None) -> Sequence:
        rid = request_id or f"r{next(ids)}"
        seq = Sequence(
            rid, [rng.randrange(50) for _ in range(rng.randrange(1, 12))], SamplingParams()
        )
        need = -(-seq.num_tokens // BLOCK)
        seq.block_table = list(range(next_block[0], next_block[0] + need))
        next_block[0] += need
        seq.num_computed_tokens = seq.num_tokens - 1
        return seq

    batch = [new_seq() for _ in range(MAX_SEQS)]
    for _ in range(200):
        hidden = graphs.stage_and_run(batch)
        assert hidden is not None and hidden.shape[0] == len(batch)
        _check(graphs, batch)
        for seq in batch:
            _decode_ready(seq, next_block)
        event = rng.random()
        if event < 0.15 and len(batch) > 1:  # a request finishes: later rows shift
            batch.pop(rng.randrange(len(batch)))
        elif event < 0.25:  # preempted and readmitted: a new table list, same request id
            seq = rng.choice(batch)
            seq.block_table = list(range(next_block[0], next_block[0] + len(seq.block_table)))
            next_block[0] += len(seq.block_table)
        elif event < 0.3:  # a finished request's id is reused by a new request
            old = batch.pop(rng.randrange(len(batch)))
            batch.append(new_seq(old.request_id))
        if len(batch) < MAX_SEQS and rng.random() < 0.3:
            batch.insert(rng.randrange(len(batch) + 1), new_seq())
        if rng.random() < 0.1:
            rng.shuffle(batch)
        batch = [seq for seq in batch if seq.num_tokens < MAX_LEN - 1]
        if not batch:
            batch.append(new_seq())
    # More request ids than the mirror has rows: it was rebuilt at least once.
    assert next(ids) > 4 * MAX_SEQS


def test_not_staged_when_a_sequence_is_not_at_its_last_token() -> None:
    graphs = _graphs()
    seq = Sequence("a", [1, 2, 3, 4, 5], SamplingParams())
    seq.block_table = [3, 4]
    seq.num_computed_tokens = 2  # a 1-token chunk in the middle of the prompt
    assert graphs.stage_and_run([seq]) is None
    assert all(g.calls == 0 for g in graphs.graphs.values())  # type: ignore[attr-defined]
    seq.num_computed_tokens = 4
    assert graphs.stage_and_run([seq]) is not None
    _check(graphs, [seq])
