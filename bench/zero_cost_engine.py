"""ZeroCostEngine: ``LLMEngine``'s interface with no model, for benchmarking the queue path.

A benchmark tool, not a test double: ``bench/queue_throughput.py`` runs an unchanged
``chatq worker`` with ``--engine-factory bench.zero_cost_engine:ZeroCostEngine.from_options``
so that everything measured is queue (Redis, intake, IPC, aggregation), none of it inference.
The engine process picks up ``SamplingParams`` from this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SamplingParams:
    """What the engine process builds from each request (same fields as gpu_engine's)."""

    max_tokens: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    ignore_eos: bool = False


@dataclass(frozen=True)
class _Out:
    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_cached_tokens: int


@dataclass(frozen=True)
class _Capacity:
    free_kv_tokens: int
    total_kv_tokens: int
    waiting_tokens: int
    running_seqs: int
    waiting_seqs: int
    max_num_seqs: int


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

    def step(self) -> list[_Out]:
        outs = [_Out(rid, [], True, "abort", 0, 0) for rid in self._aborted]
        self._aborted = []
        for rid, state in list(self._live.items()):
            state[1] += 1
            done = state[1] >= state[0]
            outs.append(_Out(rid, [self.TOKEN_ID], done, "length" if done else None, state[2], 0))
            if done:
                del self._live[rid]
        return outs

    def capacity(self) -> _Capacity:
        return _Capacity(self.KV_TOKENS, self.KV_TOKENS, 0, len(self._live), 0, self.max_num_seqs)
