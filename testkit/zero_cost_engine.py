"""ZeroCostEngine: ``LLMEngine``'s interface with no model, for benchmarking the queue path.

A benchmark tool, not a test double: ``bench/queue_throughput.py`` runs an unchanged
``chatq worker`` with
``--engine-factory testkit.zero_cost_engine:ZeroCostEngine.from_options`` so that
everything measured is queue (Redis, intake, IPC, aggregation), none of it inference.
It speaks the engine's own plain-data types (``gpu_engine.outputs``, no torch).

``step_s`` (option ``zero_cost_step_s`` or env ``CHATQ_ZERO_COST_STEP_S``; default 0) paces
steps like a device would: a step that starts less than ``step_s`` after the previous one
waits out the rest, so long answers keep the worker's aggregator busy at a set token rate
(``bench/queue_busy_latency.py``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

from gpu_engine.outputs import EngineCapacity, StepOutput


class ZeroCostEngine:
    """LLMEngine's interface with no model: each step gives every request one fixed token
    until ``max_tokens``. Lets the benchmark isolate the queue path."""

    TOKEN_ID = 300
    KV_TOKENS = 1 << 24

    def __init__(self, max_num_seqs: int = 256, step_s: float = 0.0) -> None:
        self.max_num_seqs = max_num_seqs
        self.step_s = step_s
        self._next_step_s = 0.0  # monotonic time the next step may start
        self.eos_token_ids = [2]
        self._live: dict[str, list[int]] = {}  # id → [max_tokens, generated, prompt tokens]
        self._aborted: list[str] = []

    @classmethod
    def from_options(cls, model: str, **options: Any) -> ZeroCostEngine:
        step_s = options.get("zero_cost_step_s", os.environ.get("CHATQ_ZERO_COST_STEP_S", 0))
        return cls(max_num_seqs=int(options.get("max_num_seqs", 256)), step_s=float(step_s))

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: Any,
        *,
        priority: int = 0,
        deadline_unix_s: float | None = None,
    ) -> None:
        self._live[request_id] = [params.max_tokens, 0, len(prompt_token_ids)]

    def abort(self, request_id: str) -> bool:
        if self._live.pop(request_id, None) is None:
            return False
        self._aborted.append(request_id)
        return True

    def has_unfinished(self) -> bool:
        return bool(self._live or self._aborted)

    def step(self) -> list[StepOutput]:
        if self.step_s > 0:
            now = time.monotonic()
            if now < self._next_step_s:
                time.sleep(self._next_step_s - now)
            self._next_step_s = max(now, self._next_step_s) + self.step_s
        outs = [StepOutput(rid, [], True, "abort", 0, 0) for rid in self._aborted]
        self._aborted = []
        for rid, state in list(self._live.items()):
            state[1] += 1
            done = state[1] >= state[0]
            outs.append(
                StepOutput(rid, [self.TOKEN_ID], done, "length" if done else None, state[2], 0)
            )
            if done:
                del self._live[rid]
        return outs

    def capacity(self) -> EngineCapacity:
        return EngineCapacity(
            self.KV_TOKENS, self.KV_TOKENS, 0, len(self._live), 0, self.max_num_seqs
        )
