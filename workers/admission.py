"""How much work this worker takes from Redis: a cost budget fed by the engine's capacity.

Each admitted request costs ``prompt tokens + expected output tokens`` of KV cache. The
worker keeps

    committed cost ≤ total KV tokens + headroom      and      requests ≤ max_num_seqs × k

so the engine always has a little queued work to start the moment a sequence finishes
(headroom defaults to one step's token budget), while work it could not start soon stays
in Redis where another worker can take it. Expected output starts at ``max_tokens`` and,
after a few completions, follows an EWMA of the fraction of ``max_tokens`` answers really
use (×1.5, never above ``max_tokens``): chat answers usually end well before the cap, and
the engine preempts if the estimate was low. The live snapshot also pauses pulls while the
engine's own waiting queue holds more than the headroom (it is behind, e.g. after
preemptions). ``admitted`` is the registry of everything this worker holds. A worker with
several host processes gives each an equal ``share`` of both bounds.
"""

from __future__ import annotations

import asyncio
import math

from gpu_engine.outputs import EngineCapacity
from workers.request import InflightRequest

WARMUP_COMPLETIONS = 8
EWMA_ALPHA = 0.1
SAFETY_FACTOR = 1.5
DEFAULT_AVG_COST_TOKENS = 256


class Admission:
    """This worker's cost budget and the registry of what it holds (see the module docstring)."""

    def __init__(
        self,
        capacity: EngineCapacity,
        *,
        max_num_seqs: int,
        inflight_factor: float,
        headroom_tokens: int,
        share: float = 1.0,
    ) -> None:
        self.capacity = capacity
        self.share = share  # of the engine: 1 / the worker's host processes
        self.max_requests = max(1, math.floor(max_num_seqs * inflight_factor * share))
        self.headroom_tokens = headroom_tokens
        self.admitted: dict[str, InflightRequest] = {}
        self.committed_tokens = 0
        self._used_fraction = 1.0  # EWMA of completion_tokens / max_tokens
        self._completions = 0
        self._avg_cost: float | None = None  # EWMA of admitted costs
        self.changed = asyncio.Event()  # set when room may have appeared

    # --- costs ---

    def expected_output_tokens(self, max_tokens: int) -> int:
        if self._completions < WARMUP_COMPLETIONS:
            return max_tokens
        fraction = min(1.0, self._used_fraction * SAFETY_FACTOR)
        return max(1, min(max_tokens, math.ceil(max_tokens * fraction)))

    def cost_tokens(self, prompt_tokens: int, max_tokens: int, n: int = 1) -> int:
        """A request's KV cost: its prompt once (n answers share its blocks) and each
        answer's expected output."""
        return prompt_tokens + n * self.expected_output_tokens(max_tokens)

    @property
    def budget_tokens(self) -> int:
        return int((self.capacity.total_kv_tokens + self.headroom_tokens) * self.share)

    # --- decisions ---

    def pull_count(self) -> int:
        """How many entries to read now (0: wait for ``changed``)."""
        slots = self.max_requests - len(self.admitted)
        if slots <= 0:
            return 0
        if self.admitted and self.capacity.waiting_tokens > self.headroom_tokens:
            return 0
        room = self.budget_tokens - self.committed_tokens
        avg = max(1.0, self._avg_cost or DEFAULT_AVG_COST_TOKENS)
        fit = int(room // avg)
        return max(1, min(slots, fit)) if not self.admitted else max(0, min(slots, fit))

    def fits_alone(self, prompt_tokens: int, max_tokens: int) -> bool:
        """False when the request could never fit in the KV cache even by itself."""
        return prompt_tokens + max_tokens <= self.capacity.total_kv_tokens

    # --- bookkeeping ---

    def admit(self, req: InflightRequest) -> None:
        self.admitted[req.request_id] = req
        self.committed_tokens += req.cost_tokens
        prev = self._avg_cost
        self._avg_cost = req.cost_tokens if prev is None else 0.8 * prev + 0.2 * req.cost_tokens

    def release(self, req: InflightRequest) -> None:
        """The request's final result is decided: its cost frees up."""
        if self.admitted.pop(req.request_id, None) is None:
            return
        self.committed_tokens -= req.cost_tokens
        max_tokens = req.env.params.max_tokens
        used = min(1.0, req.detok.num_tokens / max(1, max_tokens))
        self._used_fraction += EWMA_ALPHA * (used - self._used_fraction)
        self._completions += 1
        self.changed.set()

    def update(self, capacity: EngineCapacity) -> None:
        self.capacity = capacity
        self.changed.set()
