"""What the engine hands back (plain data, no torch: the worker's host process imports it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple


class StepOutput(NamedTuple):
    """One request's progress in one ``LLMEngine.step()``: usually one new token; empty when
    the request finished without running (abort, deadline). A tuple (the engine builds one
    per running request per step; the worker's engine process hands them to msgpack as
    they are)."""

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | "deadline" once finished
    num_prompt_tokens: int
    num_cached_tokens: int  # prompt tokens served from the prefix cache at admission

    @classmethod
    def make(
        cls,
        request_id: str,
        new_token_ids: list[int],
        finished: bool,
        finish_reason: str | None,
        num_prompt_tokens: int,
        num_cached_tokens: int,
    ) -> StepOutput:
        """``StepOutput(...)`` without the keyword-argument handling of NamedTuple's
        ``__new__`` (the hot path)."""
        return tuple.__new__(
            cls,
            (
                request_id,
                new_token_ids,
                finished,
                finish_reason,
                num_prompt_tokens,
                num_cached_tokens,
            ),
        )


class TokenLogprobs(NamedTuple):
    """A sampled token's log probability under the model, and the ``top`` most likely
    tokens of that step as (token id, log probability), best first."""

    logprob: float
    top: list[tuple[int, float]]


@dataclass(frozen=True)
class EngineCapacity:
    """How much more work the engine can take: what a worker sizes its next pull by.

    ``free_kv_tokens`` counts token slots in unreferenced blocks (evictable prefix-cache
    blocks included); running sequences still grow into them, and ``waiting_tokens`` (tokens
    of admitted-but-waiting requests) will claim them first.
    """

    free_kv_tokens: int
    total_kv_tokens: int
    waiting_tokens: int
    running_seqs: int
    waiting_seqs: int
    max_num_seqs: int
    num_preemptions: int = 0  # since the engine started (a counter, for metrics)


@dataclass
class RequestOutput:
    """The finished result of one ``LLM.generate`` / ``LLM.chat`` prompt."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated ids (a final eos / stop token included)
    text: str  # detokenized output without special tokens, cut before a matched stop string
    finish_reason: str | None  # "stop" | "length" | "abort" | "deadline"
    logprobs: list[TokenLogprobs] | None = None  # one per token id, when asked for
