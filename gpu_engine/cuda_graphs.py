"""Steps captured as CUDA graphs at fixed shapes, replayed from static buffers.

A decode-only step (every sequence brings one token) has shapes that depend only on the
batch size, so the whole model forward for batch sizes 1, 2, 4, 8, 16, 32, ... max_num_seqs
is captured once (largest first, one shared memory pool) and replayed: one launch instead of
~10 per layer, no Python in the loop. A step with n sequences copies its inputs into the
first n rows of the static buffers and replays the smallest graph of at least n rows; the
padding rows get slot -1 (their K/V is not stored) and context length 0 (the attention
kernels write zeros for them). Attention backends must not read host values in their decode
path (the Triton and flash-attn backends do not; the torch reference does, and is never
captured).

Steps with prefill chunks (``MixedGraphs``, Triton backend on one device) are captured per
padded prefill-token count: prefill rows first, then a fixed block of max_num_seqs decode
rows; the prefill attention reads a tile table staged like the other inputs (see
``MixedGraphs``). Both kinds are captured by ``capture_graphs`` and share the block-table
mirror.

Shared-prefix attention (``shared_prefix_group`` given): decode graphs are captured a second
time with the shared-prefix kernels (``kernels.shared_prefix``) reading static group buffers
(``SharedPrefixStaging``); a step whose sequences form groups (``find_prefix_groups`` on the
staged block tables) replays those, any other step the plain graphs.

``stage_and_run`` fills the static inputs straight from the scheduled sequences: two pinned
host buffers (int64: token ids, positions, slots; int32: context lengths, block tables) whose
layout mirrors the device buffers, so a decode step costs two host-to-device copies and one
replay. Block tables come from a host mirror updated incrementally (``BlockTableMirror``): a
step writes only blocks appended since the sequence's previous step, then one numpy gather
fills the staged rows; slots and lengths are computed in numpy from the positions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from collections.abc import Sequence as SequenceABC

import numpy as np
import torch
from torch import nn

from gpu_engine.block_tables import BlockTableMirror, slot_ids
from gpu_engine.context import forward_context
from gpu_engine.kernels.prefill_tiles import max_prefill_tiles, prefill_block_m, prefill_tiles
from gpu_engine.layers.base import AttentionMetadata
from gpu_engine.prefix_groups import find_prefix_groups, prefix_block_s
from gpu_engine.sampling import resolve_pending
from gpu_engine.sequence import Sequence
from gpu_engine.shared_staging import SharedPrefixStaging

log = logging.getLogger(__name__)


@torch.inference_mode()
def capture_graphs(
    sizes: list[int],
    meta: Callable[[int], AttentionMetadata],
    forward: Callable[[int], None],
    pool: tuple[int, int] | None = None,
) -> dict[int, torch.cuda.CUDAGraph]:
    """One CUDA graph of ``forward(size)`` per size, largest first, sharing one memory pool
    (a smaller graph reuses the largest one's activations; ``pool``: another family's); each
    is run once eagerly first (Triton compiles, cuBLAS picks its kernels) with ``meta(size)``
    as the step's metadata."""
    graphs: dict[int, torch.cuda.CUDAGraph] = {}
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for size in sorted(sizes, reverse=True):
            with forward_context(meta(size)):
                forward(size)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    forward(size)
            if pool is None:
                pool = graph.pool()
            graphs[size] = graph
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    return graphs


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
        last_tokens: torch.Tensor | None = None,
        shared_prefix_group: int | None = None,
    ) -> None:
        self.model = model
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.last_tokens = last_tokens
        self.batch_sizes = graph_batch_sizes(max_num_seqs)
        max_bs = self.batch_sizes[-1]
        max_blocks = -(-max_model_len // block_size)
        # Static inputs/outputs every graph reads and writes (row i = sequence i), as views
        # of two packed buffers: int64 [ids | positions | slots], int32 [lens | tables].
        self._max_bs, self._max_blocks = max_bs, max_blocks
        self._dev64 = torch.zeros(3 * max_bs, dtype=torch.int64, device=device)
        self._dev32 = torch.zeros(max_bs * (1 + max_blocks), dtype=torch.int32, device=device)
        # Two sets of pinned staging buffers, used in turn: a step is staged while the one
        # before it may still wait for its copies (asynchronous scheduling).
        self._staging = _StagingPair(self._dev64, self._dev32, device)
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
        # Room for this batch and the next few generations of requests before a rewrite.
        self.mirror = BlockTableMirror(4 * max_bs, max_blocks)
        # Shared-prefix variants (GQA group size given): static group buffers, graphs.
        self.sharing: SharedPrefixStaging | None = None
        if shared_prefix_group is not None:
            block_s = prefix_block_s(shared_prefix_group)
            self.sharing = SharedPrefixStaging(max_bs, max_blocks, block_s, device)
        self.shared_graphs: dict[int, torch.cuda.CUDAGraph] = {}

    def _meta(self, bs: int, shared: bool = False) -> AttentionMetadata:
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
            shared=self.sharing.shared(bs) if shared and self.sharing else None,
        )

    def _forward(self, bs: int) -> None:
        ids = self.input_ids[:bs]
        if self.last_tokens is not None:
            ids = resolve_pending(ids, self.last_tokens)
        self.hidden[:bs] = self.model(ids, self.positions[:bs])

    def capture(self) -> None:
        self.graphs = capture_graphs(self.batch_sizes, self._meta, self._forward)
        log.info("captured decode CUDA graphs for batch sizes %s", self.batch_sizes)
        if self.sharing is not None:
            sizes = [b for b in self.batch_sizes if b >= 2]
            pool = self.graphs[self.batch_sizes[-1]].pool()
            self.shared_graphs = capture_graphs(
                sizes, lambda bs: self._meta(bs, shared=True), self._forward, pool
            )
            log.info("captured shared-prefix decode CUDA graphs for batch sizes %s", sizes)

    def can_run(self, num_seqs: int, max_blocks: int) -> bool:
        return num_seqs <= self.batch_sizes[-1] and max_blocks <= self.block_tables.shape[1]

    def stage_and_run(self, seqs: SequenceABC[Sequence]) -> torch.Tensor | None:
        """One decode step of ``seqs`` (each computes its one last token): fills the pinned
        host buffers, copies them in (two asynchronous copies), replays. Returns hidden
        [n, hidden] (a view of the static output, valid until the next replay), or None,
        having run nothing, when the step does not fit the graphs (a sequence that is not at
        its last token, more sequences or blocks than captured). Token ids may be
        placeholders of the previous step's samples (resolved in the graph). A set of host
        buffers is rewritten two steps later, after the caller has synchronised on the
        sampled tokens of the step that used it, so its copies have completed."""
        n = len(seqs)
        if n > self._max_bs:
            return None
        mirror = self.mirror
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
        host64, host32 = self._staging.next()
        h64, h32 = host64.numpy(), host32.numpy()
        pos = h64[m : m + n]
        pos[:] = positions
        h64[:n] = token_ids
        row_idx = np.array(rows, dtype=np.intp)
        # slot = table[p // block_size] * block_size + p % block_size, per row
        h64[2 * m : 2 * m + n] = slot_ids(mirror.tables, row_idx, pos, block_size)
        h64[2 * m + n : 2 * m + bs] = -1  # padding rows store nothing
        h32[:n] = pos + 1
        h32[n:bs] = 0  # ... and attend to nothing (zeros out)
        # Columns past a row's table are stale; the kernels read ceil(len / block_size).
        used = int(pos.max()) // block_size + 1
        h32[m:].reshape(m, w)[:n, :used] = mirror.tables[row_idx, :used]
        self._dev64.copy_(host64, non_blocking=True)
        used32 = m + bs * w  # lengths + the first bs table rows
        self._dev32[:used32].copy_(host32[:used32], non_blocking=True)
        self._graph_for(bs, row_idx, pos).replay()
        self.num_replays += 1
        return self.hidden[:n]

    def _graph_for(self, bs: int, rows: np.ndarray, positions: np.ndarray) -> torch.cuda.CUDAGraph:
        """The shared-prefix graph of ``bs`` rows with this step's groups staged, when the
        sequences (mirror ``rows``, current tokens at ``positions``) form any; else the
        plain graph."""
        sharing = self.sharing
        if sharing is not None and bs in self.shared_graphs:
            groups = find_prefix_groups(
                self.mirror.tables, rows, positions, self.block_size, sharing.block_s
            )
            if groups is not None:
                sharing.stage(groups, len(rows), self.block_size)
                return self.shared_graphs[bs]
        return self.graphs[bs]

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


class _StagingPair:
    """Two sets of pinned host buffers shaped like a graph family's two device input buffers
    (int64, int32), handed out in turn by ``next``."""

    def __init__(self, dev64: torch.Tensor, dev32: torch.Tensor, device: torch.device) -> None:
        pin = device.type == "cuda"
        self._sets = [
            (
                torch.zeros(dev64.shape[0], dtype=torch.int64, pin_memory=pin),
                torch.zeros(dev32.shape[0], dtype=torch.int32, pin_memory=pin),
            )
            for _ in range(2)
        ]
        self._turn = 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        self._turn ^= 1
        return self._sets[self._turn]

    @property
    def last(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The set ``next`` handed out most recently."""
        return self._sets[self._turn]


def mixed_token_buckets(max_num_batched_tokens: int) -> list[int]:
    """Padded prefill-token counts captured for mixed steps: powers of two from 16, and the
    step's token budget itself."""
    sizes = [1 << k for k in range(4, 31) if (1 << k) < max_num_batched_tokens]
    return [*sizes, max_num_batched_tokens]


class MixedGraphs:
    """Steps with prefill chunks (alone or with decodes), captured per padded token count.

    Layout of a step captured for ``TP`` prefill tokens: token rows [0, TP) hold the prefill
    chunks back to back (rows past their total are padding: slot -1, no attention tile),
    rows [TP, TP + S) the decode sequences (S = max_num_seqs; padding rows have context
    length 0). Sequence rows of the metadata: [0, S) prefill, [S, 2S) decode. The prefill
    attention walks a tile table sized for the worst case of ``TP`` tokens, so no host value
    of the step reaches a kernel and one replay serves any mix that fits. Linear layers
    compute the padding rows too: the buckets double, so at most half of the prefill part
    (plus the unused decode rows) is padding, against ~10 launches per layer saved.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        block_size: int,
        hidden_size: int,
        dtype: torch.dtype,
        device: torch.device,
        mirror: BlockTableMirror,
        last_tokens: torch.Tensor | None = None,
    ) -> None:
        self.model = model
        self.last_tokens = last_tokens
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.buckets = mixed_token_buckets(max_num_batched_tokens)
        self._block_m = {tp: prefill_block_m(dtype, tp) for tp in self.buckets}
        self._num_tiles = {
            tp: max_prefill_tiles(tp, max_num_seqs, self._block_m[tp]) for tp in self.buckets
        }
        s = self._s = max_num_seqs
        w = self._w = mirror.max_blocks
        r = self._r = self.buckets[-1] + s  # token rows of the largest bucket
        nt = max(self._num_tiles.values())
        # int64: [ids | positions | slots] (r rows each) | sample rows (2s)
        # int32: [seq lens (2s) | cu_seqlens (s + 1, padded to s + 4) | tiles (2 nt) | tables]
        self._cu_off = 2 * s
        self._tiles_off = self._cu_off + s + 4
        self._tables_off = self._tiles_off + 2 * nt
        self._dev64 = torch.zeros(3 * r + 2 * s, dtype=torch.int64, device=device)
        self._dev32 = torch.zeros(self._tables_off + 2 * s * w, dtype=torch.int32, device=device)
        self._staging = _StagingPair(self._dev64, self._dev32, device)
        self._dev64[2 * r : 3 * r].fill_(-1)  # slots: store nothing until staged
        self._dev32[self._tiles_off : self._tables_off].fill_(-1)  # tiles: none
        self.hidden = torch.zeros(r, hidden_size, dtype=dtype, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._mirror = mirror
        self.num_replays = 0

    def _meta(self, tp: int) -> AttentionMetadata:
        s, r, w = self._s, self._r, self._w
        d32 = self._dev32
        nt = self._num_tiles[tp]
        return AttentionMetadata(
            slot_mapping=self._dev64[2 * r : 2 * r + tp + s],
            cu_seqlens_q=d32[self._cu_off : self._cu_off + s + 1],
            seq_lens=d32[: 2 * s],
            block_tables=d32[self._tables_off :].view(2 * s, w),
            max_query_len=tp,
            max_seq_len=self.max_model_len,
            num_prefill_seqs=s,
            num_decode_seqs=s,
            query_lens_host=[],
            seq_lens_host=[],
            num_prefill_tokens=tp,
            prefill_tiles=d32[self._tiles_off : self._tiles_off + 2 * nt].view(nt, 2),
            prefill_block_m=self._block_m[tp],
        )

    def _forward(self, tp: int) -> None:
        n, r = tp + self._s, self._r
        ids, positions = self._dev64[:n], self._dev64[r : r + n]
        if self.last_tokens is not None:
            ids = resolve_pending(ids, self.last_tokens)
        self.hidden[:n] = self.model(ids, positions)

    def capture(self) -> None:
        self.graphs = capture_graphs(self.buckets, self._meta, self._forward)
        log.info("captured mixed-step CUDA graphs for prefill token counts %s", self.buckets)

    def stage_and_run(
        self, seqs: SequenceABC[Sequence], query_lens: SequenceABC[int], num_prefill: int
    ) -> tuple[torch.Tensor, list[int]] | None:
        """One step of ``seqs`` (the first ``num_prefill`` bring ``query_lens`` new tokens,
        the rest one token each, their last): stages the padded layout, replays, and returns
        the hidden states of the rows that sample (a new tensor) with their indices into
        ``seqs``; None, having run nothing, when the step does not fit the captured shapes.
        Staging alternates between two sets of host buffers, as ``DecodeGraphs`` does."""
        s, r, w, bs = self._s, self._r, self._w, self.block_size
        num_decode = len(seqs) - num_prefill
        if num_prefill > s or num_decode > s or num_prefill == 0:
            return None
        q = np.asarray(query_lens[:num_prefill], dtype=np.int64)
        num_tokens = int(q.sum())
        if num_tokens > self.buckets[-1]:
            return None
        tp = next(b for b in self.buckets if b >= num_tokens)
        mirror = self._mirror
        mirror.reserve(len(seqs))
        rows = [mirror.row(seq.request_id, seq.block_table) for seq in seqs]
        if min(rows) < 0:
            return None
        prefill, decode = seqs[:num_prefill], seqs[num_prefill:]
        starts = np.fromiter((x.num_computed_tokens for x in prefill), np.int64, num_prefill)
        ends = starts + q
        tokens: list[int] = []
        for x, a, b in zip(prefill, starts.tolist(), ends.tolist(), strict=True):
            tokens += x.token_ids[a:b]
        dpos = np.fromiter((x.num_computed_tokens for x in decode), np.int64, num_decode)
        dtok = [x.token_ids[-1] for x in decode]
        if any(x.num_computed_tokens + 1 != x.num_tokens for x in decode):
            return None

        host64, host32 = self._staging.next()
        h64, h32 = host64.numpy(), host32.numpy()
        ids, pos, slots = h64[:r], h64[r : 2 * r], h64[2 * r : 3 * r]
        cu = np.zeros(num_prefill + 1, dtype=np.int64)
        np.cumsum(q, out=cu[1:])
        ppos = np.arange(num_tokens, dtype=np.int64) + np.repeat(starts - cu[:-1], q)
        prow = np.asarray(rows[:num_prefill], dtype=np.intp)
        drow = np.asarray(rows[num_prefill:], dtype=np.intp)
        tables = mirror.tables
        ids[:num_tokens] = tokens
        pos[:num_tokens] = ppos
        slots[:num_tokens] = slot_ids(tables, np.repeat(prow, q), ppos, bs)
        ids[num_tokens:tp] = 0
        pos[num_tokens:tp] = 0
        slots[num_tokens:tp] = -1
        ids[tp : tp + num_decode] = dtok
        pos[tp : tp + num_decode] = dpos
        slots[tp : tp + num_decode] = slot_ids(tables, drow, dpos, bs)
        ids[tp + num_decode : tp + s] = 0
        pos[tp + num_decode : tp + s] = 0
        slots[tp + num_decode : tp + s] = -1
        # Rows that sample: a prefill chunk that reaches its sequence's last token, and
        # every decode row; indices into seqs in the same order.
        last = np.fromiter((x.num_tokens for x in prefill), np.int64, num_prefill) == ends
        sample_seqs = np.flatnonzero(last).tolist() + list(range(num_prefill, len(seqs)))
        sample_rows = h64[3 * r : 3 * r + len(sample_seqs)]
        num_last = int(last.sum())
        sample_rows[:num_last] = cu[1:][last] - 1
        sample_rows[num_last:] = np.arange(tp, tp + num_decode)

        seq_lens = h32[: 2 * s]
        seq_lens[:num_prefill] = ends
        seq_lens[num_prefill:s] = 0
        seq_lens[s : s + num_decode] = dpos + 1
        seq_lens[s + num_decode :] = 0
        h32[self._cu_off : self._cu_off + num_prefill + 1] = cu
        h32[self._cu_off + num_prefill + 1 : self._cu_off + s + 1] = num_tokens
        nt = self._num_tiles[tp]
        h32[self._tiles_off : self._tiles_off + 2 * nt] = prefill_tiles(
            q, self._block_m[tp], nt
        ).reshape(-1)
        table_rows = h32[self._tables_off :].reshape(2 * s, w)
        used_p = int(ends.max() - 1) // bs + 1
        table_rows[:num_prefill, :used_p] = tables[prow, :used_p]
        if num_decode:
            used_d = int(dpos.max()) // bs + 1
            table_rows[s : s + num_decode, :used_d] = tables[drow, :used_d]

        self._dev64.copy_(host64, non_blocking=True)
        head = self._tiles_off + 2 * nt
        self._dev32[:head].copy_(host32[:head], non_blocking=True)
        t0, t1 = self._tables_off, self._tables_off + num_prefill * w
        self._dev32[t0:t1].copy_(host32[t0:t1], non_blocking=True)
        if num_decode:
            t0 = self._tables_off + s * w
            t1 = t0 + num_decode * w
            self._dev32[t0:t1].copy_(host32[t0:t1], non_blocking=True)
        graph = self.graphs.get(tp)
        if graph is not None:
            graph.replay()
        else:  # not captured (the CPU tests of this layout): the same forward, eagerly
            with forward_context(self._meta(tp)):
                self._forward(tp)
        self.num_replays += 1
        picked = self._dev64[3 * r : 3 * r + len(sample_seqs)]
        return self.hidden[picked], sample_seqs
