"""chatq's inference engine: continuous batching over a paged KV cache.

``from gpu_engine import LLM, LLMEngine, SamplingParams, RequestOutput``. The torch-free parts
(config, sampling params, outputs, block manager, scheduler) import without torch; ``LLM`` and
``LLMEngine`` load torch on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gpu_engine.config import EngineConfig
from gpu_engine.errors import EngineError
from gpu_engine.outputs import EngineCapacity, RequestOutput, StepOutput, TokenLogprobs
from gpu_engine.sequence import (
    InvalidRequestError,
    RefusalReason,
    SamplingParams,
    StructuredOutput,
)

if TYPE_CHECKING:
    from gpu_engine.engine import LLM, LLMEngine

__all__ = [
    "LLM",
    "EngineCapacity",
    "EngineConfig",
    "EngineError",
    "InvalidRequestError",
    "LLMEngine",
    "RefusalReason",
    "RequestOutput",
    "SamplingParams",
    "StepOutput",
    "StructuredOutput",
    "TokenLogprobs",
]


def __getattr__(name: str) -> Any:
    if name in ("LLM", "LLMEngine"):
        from gpu_engine import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'gpu_engine' has no attribute {name!r}")
