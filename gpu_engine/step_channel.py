"""Rank 0 -> ranks 1..N-1: each step's model inputs, as broadcast tensors (no pickle).

Per step, three broadcasts from rank 0:

1. header, int64 [HEADER_LEN], control group (CPU): command (STEP / EXIT) and the sizes and
   scalars of the step: num_tokens T, num_seqs S, block-table width B, sampled rows R,
   max_query_len, max_seq_len, num_prefill_seqs;
2. host lists, int64 [2S], control group: query lengths then sequence lengths (the host copies
   attention backends read without a device sync);
3. payload, int64 [3T + 2S + 1 + S*B + R], device group: input_ids, positions, slot_mapping,
   cu_seqlens_q, seq_lens, block_tables (row-major), sample_rows.

Workers block on (1) between steps; EXIT ends their loop.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from gpu_engine.layers.base import AttentionMetadata
from gpu_engine.model_runner import StepInputs
from gpu_engine.tp_group import TPGroup

HEADER_LEN = 16
_EXIT, _STEP = 0, 1


class StepChannel:
    def __init__(self, group: TPGroup, device: torch.device) -> None:
        self.group = group
        self.device = device
        self._header = torch.zeros(HEADER_LEN, dtype=torch.int64)  # CPU: the gloo control group

    def _broadcast_header(self, values: list[int]) -> None:
        self._header.zero_()
        self._header[: len(values)] = torch.tensor(values, dtype=torch.int64)
        dist.broadcast(self._header, 0, group=self.group.control_group)

    # -- rank 0 --------------------------------------------------------------------------
    def send(self, inputs: StepInputs) -> None:
        meta = inputs.meta
        num_seqs, width = meta.block_tables.shape
        self._broadcast_header(
            [
                _STEP,
                inputs.input_ids.numel(),
                num_seqs,
                width,
                inputs.sample_rows.numel(),
                meta.max_query_len,
                meta.max_seq_len,
                meta.num_prefill_seqs,
            ]
        )
        host = torch.tensor(meta.query_lens_host + meta.seq_lens_host, dtype=torch.int64)
        dist.broadcast(host, 0, group=self.group.control_group)
        payload = torch.cat(
            [
                inputs.input_ids,
                inputs.positions,
                meta.slot_mapping,
                meta.cu_seqlens_q.long(),
                meta.seq_lens.long(),
                meta.block_tables.long().flatten(),
                inputs.sample_rows,
            ]
        )
        dist.broadcast(payload, 0, group=self.group.device_group)

    def send_exit(self) -> None:
        self._broadcast_header([_EXIT])

    # -- ranks 1..N-1 --------------------------------------------------------------------
    def recv(self) -> StepInputs | None:
        """The next step's inputs on this rank's device; None when rank 0 says exit."""
        dist.broadcast(self._header, 0, group=self.group.control_group)
        command, t, s, b, r, max_query_len, max_seq_len, num_prefill = self._header[:8].tolist()
        if command == _EXIT:
            return None
        host = torch.empty(2 * s, dtype=torch.int64)
        dist.broadcast(host, 0, group=self.group.control_group)
        lens = host.tolist()
        payload = torch.empty(3 * t + 2 * s + 1 + s * b + r, dtype=torch.int64, device=self.device)
        dist.broadcast(payload, 0, group=self.group.device_group)
        sizes = [t, t, t, s + 1, s, s * b, r]
        ids, positions, slots, cu, seq_lens, tables, rows = torch.split(payload, sizes)
        meta = AttentionMetadata(
            slot_mapping=slots,
            cu_seqlens_q=cu.int(),
            seq_lens=seq_lens.int(),
            block_tables=tables.view(s, b).int(),
            max_query_len=max_query_len,
            max_seq_len=max_seq_len,
            num_prefill_seqs=num_prefill,
            num_decode_seqs=s - num_prefill,
            query_lens_host=lens[:s],
            seq_lens_host=lens[s:],
        )
        return StepInputs(ids, positions, meta, rows, sample_seqs=[])
