"""ZeroCostEngine: ``LLMEngine``'s interface with no model, for benchmarking the queue path.

A benchmark tool, not a test double: ``bench/queue_throughput.py`` runs an unchanged
``chatq worker`` with ``--engine-factory bench.zero_cost_engine:ZeroCostEngine.from_options``
so that everything measured is queue (Redis, intake, IPC, aggregation), none of it inference.
It speaks the engine's own plain-data types (``gpu_engine.outputs``, no torch).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gpu_engine.outputs import EngineCapacity, StepOutput


class ZeroCostEngine:
    """LLMEngine's interface with no model: each step gives every request one fixed token
    until ``max_tokens``. Lets the benchmark isolate the queue path."""

    TOKEN_ID = 300
    KV_TOKENS = 1 << 24

    def __init__(self, max_num_seqs: int = 256) -> None:
        self.max_num_seqs = max_num_seqs
        self.eos_token_ids = [2]
        self._live: dict[str, list[int]] = {}  # id → [max_tokens, generated, prompt tokens]
        self._aborted: list[str] = []

    @classmethod
    def from_options(cls, model: str, **options: Any) -> ZeroCostEngine:
        return cls(max_num_seqs=int(options.get("max_num_seqs", 256)))

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: Any,
        *,
        priority: int = 0,
        deadline: float | None = None,
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
