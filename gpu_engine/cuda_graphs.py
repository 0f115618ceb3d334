"""Decode steps captured as CUDA graphs at fixed batch sizes, replayed from static buffers.

A decode-only step (every sequence brings one token) has shapes that depend only on the
batch size, so the whole model forward for batch sizes 1, 2, 4, 8, 16, 32, ... max_num_seqs
is captured once (largest first, one shared memory pool) and replayed: one launch instead of
~10 per layer, no Python in the loop. A step with n sequences copies its inputs into the
first n rows of the static buffers and replays the smallest graph of at least n rows; the
padding rows get slot -1 (their K/V is not stored) and context length 0 (the attention
kernels write zeros for them). Attention backends must not read host values in their decode
path (the Triton and flash-attn backends do not; the torch reference does, and is never
captured). Mixed and prefill steps run eagerly.

``stage_and_run`` fills the static inputs straight from the scheduled sequences: two pinned
host buffers (int64: token ids, positions, slots; int32: context lengths, block tables) whose
layout mirrors the device buffers, so a decode step costs two host-to-device copies and one
replay. Block tables come from a host mirror updated incrementally (``BlockTableMirror``): a
step writes only blocks appended since the sequence's previous step, then one numpy gather
fills the staged rows; slots and lengths are computed in numpy from the positions.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence as SequenceABC

import numpy as np
import torch
from torch import nn

from gpu_engine.block_tables import BlockTableMirror
from gpu_engine.context import forward_context
from gpu_engine.layers.base import AttentionMetadata
from gpu_engine.sequence import Sequence

log = logging.getLogger(__name__)


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs]
    sizes += list(range(16, max_num_seqs, 16))
    return sorted({*sizes, max_num_seqs})


class DecodeGraphs:
    def __init__(
        self,
        model: nn.Module,
        max_num_seqs: int,
        max_model_len: int,
        block_size: int,
        hidden_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.model = model
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.batch_sizes = graph_batch_sizes(max_num_seqs)
        max_bs = self.batch_sizes[-1]
        max_blocks = -(-max_model_len // block_size)
        # Static inputs/outputs every graph reads and writes (row i = sequence i), as views
        # of two packed buffers: int64 [ids | positions | slots], int32 [lens | tables].
        self._max_bs, self._max_blocks = max_bs, max_blocks
        self._dev64 = torch.zeros(3 * max_bs, dtype=torch.int64, device=device)
        self._dev32 = torch.zeros(max_bs * (1 + max_blocks), dtype=torch.int32, device=device)
        pin = device.type == "cuda"
        self._host64 = torch.zeros(3 * max_bs, dtype=torch.int64, pin_memory=pin)
        self._host32 = torch.zeros(max_bs * (1 + max_blocks), dtype=torch.int32, pin_memory=pin)
        self.input_ids = self._dev64[:max_bs]
        self.positions = self._dev64[max_bs : 2 * max_bs]
        self.slot_mapping = self._dev64[2 * max_bs :]
        self.slot_mapping.fill_(-1)
        self.seq_lens = self._dev32[:max_bs]
        self.block_tables = self._dev32[max_bs:].view(max_bs, max_blocks)
        self.num_replays = 0
        self.cu_seqlens_q = torch.arange(max_bs + 1, dtype=torch.int32, device=device)
        self.hidden = torch.zeros(max_bs, hidden_size, dtype=dtype, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._pool: tuple[int, int] | None = None
        # Room for this batch and the next few generations of requests before a rewrite.
        self._mirror = BlockTableMirror(4 * max_bs, max_blocks)

    def _meta(self, bs: int) -> AttentionMetadata:
        # Host fields describe the worst case the graph must serve (the Triton backend sizes
        # its split-K from max_seq_len); the kernels read the true lengths from seq_lens.
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:bs],
            cu_seqlens_q=self.cu_seqlens_q[: bs + 1],
            seq_lens=self.seq_lens[:bs],
            block_tables=self.block_tables[:bs],
            max_query_len=1,
            max_seq_len=self.max_model_len,
            num_prefill_seqs=0,
            num_decode_seqs=bs,
            query_lens_host=[1] * bs,
            seq_lens_host=[self.max_model_len] * bs,
        )

    @torch.inference_mode()
    def capture(self) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for bs in reversed(self.batch_sizes):
                meta = self._meta(bs)
                with forward_context(meta):
                    # Warm-up outside the graph: Triton compiles, cuBLAS picks its kernels.
                    self.hidden[:bs] = self.model(self.input_ids[:bs], self.positions[:bs])
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=self._pool, stream=stream):
                        self.hidden[:bs] = self.model(self.input_ids[:bs], self.positions[:bs])
                if self._pool is None:
                    self._pool = graph.pool()
                self.graphs[bs] = graph
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        log.info("captured decode CUDA graphs for batch sizes %s", self.batch_sizes)

    def can_run(self, num_seqs: int, max_blocks: int) -> bool:
        return num_seqs <= self.batch_sizes[-1] and max_blocks <= self.block_tables.shape[1]

    def stage_and_run(self, seqs: SequenceABC[Sequence]) -> torch.Tensor | None:
        """One decode step of ``seqs`` (each computes its one last token): fills the pinned
        host buffers, copies them in (two asynchronous copies), replays. Returns hidden
        [n, hidden] (a view of the static output, valid until the next replay), or None,
        having run nothing, when the step does not fit the graphs (a sequence that is not at
        its last token, more sequences or blocks than captured). The host buffers are
        rewritten only after the caller has synchronised on this step's sampled tokens, by
        which time the copies have completed (they precede the replay in stream order)."""
        n = len(seqs)
        if n > self._max_bs:
            return None
        mirror = self._mirror
        mirror.reserve(n)
        row_of, source, written = mirror._row_of, mirror._source, mirror._written
        token_ids: list[int] = []
        positions: list[int] = []
        rows: list[int] = []
        for seq in seqs:
            p = seq.num_computed_tokens
            toks = seq.token_ids
            if p + 1 != len(toks):
                return None
            table = seq.block_table
            r = row_of.get(seq.request_id, -1)
            # Inlined fast path of mirror.row: the row already holds this table.
            if r < 0 or source[r] is not table or written[r] != len(table):
                r = mirror.row(seq.request_id, table)
                if r < 0:
                    return None
            token_ids.append(toks[p])
            positions.append(p)
            rows.append(r)
        bs = next(b for b in self.batch_sizes if b >= n)
        m, w, block_size = self._max_bs, self._max_blocks, self.block_size
        h64, h32 = self._host64.numpy(), self._host32.numpy()
        pos = h64[m : m + n]
        pos[:] = positions
        h64[:n] = token_ids
        row_idx = np.array(rows, dtype=np.intp)
        # slot = table[p // block_size] * block_size + p % block_size, per row
        blocks = mirror.tables[row_idx, pos // block_size].astype(np.int64)
        h64[2 * m : 2 * m + n] = blocks * block_size + pos % block_size
        h64[2 * m + n : 2 * m + bs] = -1  # padding rows store nothing
        h32[:n] = pos + 1
        h32[n:bs] = 0  # ... and attend to nothing (zeros out)
        # Columns past a row's table are stale; the kernels read ceil(len / block_size).
        used = int(pos.max()) // block_size + 1
        h32[m:].reshape(m, w)[:n, :used] = mirror.tables[row_idx, :used]
        self._dev64.copy_(self._host64, non_blocking=True)
        used32 = m + bs * w  # lengths + the first bs table rows
        self._dev32[:used32].copy_(self._host32[:used32], non_blocking=True)
        self.graphs[bs].replay()
        self.num_replays += 1
        return self.hidden[:n]

    def run(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """Replay for this step's n sequences; returns hidden states [n, hidden] (a view of
        the static output, valid until the next replay)."""
        n = input_ids.shape[0]
        bs = next(b for b in self.batch_sizes if b >= n)
        width = meta.block_tables.shape[1]
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slot_mapping[:n].copy_(meta.slot_mapping, non_blocking=True)
        self.seq_lens[:n].copy_(meta.seq_lens, non_blocking=True)
        self.block_tables[:n, :width].copy_(meta.block_tables, non_blocking=True)
        if bs > n:
            self.slot_mapping[n:bs].fill_(-1)
            self.seq_lens[n:bs].zero_()
        self.graphs[bs].replay()
        self.num_replays += 1
        return self.hidden[:n]
