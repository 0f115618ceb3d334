"""A host copy of sequences' block tables as one numpy array, updated incrementally (no
torch: used by the model runner's step inputs and the CUDA-graph staging)."""

from __future__ import annotations

import numpy as np


class BlockTableMirror:
    """Block tables of recently staged sequences as one int32 array [rows, max_blocks].

    A row per request id, kept across steps: a decode step writes only the blocks its
    sequence gained since its last step (one sequence in ``block_size`` gains one), instead
    of converting every sequence's list (~100 ids each at 256 sequences: ~0.4 ms per step).
    Relies on the block manager's contract: while a sequence holds blocks its
    ``block_table`` list only grows by appends; allocation (also after a preemption) and
    ``free`` install a new list, which the identity check notices. Rows are never freed one
    by one: when a step would overflow, every row is dropped and rewritten once.
    """

    def __init__(self, num_rows: int, max_blocks: int) -> None:
        self.tables = np.zeros((num_rows, max_blocks), dtype=np.int32)
        self.max_blocks = max_blocks
        self._row_of: dict[str, int] = {}
        self._source: list[list[int] | None] = [None] * num_rows  # the list mirrored per row
        self._written: list[int] = [0] * num_rows  # ids of that list already in the row

    def reserve(self, num_seqs: int) -> None:
        """Make room for ``num_seqs`` sequences not seen before (call before ``row``)."""
        if len(self._row_of) + num_seqs > len(self._source):
            self._row_of.clear()
            self._source[:] = [None] * len(self._source)  # in place: callers may hold it

    def row(self, request_id: str, table: list[int]) -> int:
        """The row holding ``table`` (updated if it grew or changed); -1 if too wide."""
        r = self._row_of.get(request_id)
        if r is None:
            r = self._row_of[request_id] = len(self._row_of)
        n = len(table)
        if self._source[r] is table:
            k = self._written[r]
            if k == n:
                return r
        else:
            self._source[r], k = table, 0
        if n > self.max_blocks:
            self._source[r] = None
            return -1
        self.tables[r, k:n] = table[k:]
        self._written[r] = n
        return r


def slot_ids(
    tables: np.ndarray, rows: np.ndarray, positions: np.ndarray, block_size: int
) -> np.ndarray:
    """KV-cache slot of each token: ``tables[row, position // block_size] * block_size +
    position % block_size`` (int64), for tokens whose block table is row ``rows[i]``."""
    return tables[rows, positions // block_size].astype(np.int64) * block_size + (
        positions % block_size
    )
