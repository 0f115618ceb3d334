"""The per-step forward context: attention metadata that attention layers read.

The model runner sets it around each forward pass, so model ``forward`` keeps the plain
``(input_ids, positions)`` signature (and CUDA-graph capture can swap the metadata's tensors
for static buffers without touching the model).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from gpu_engine.errors import EngineError
from gpu_engine.layers.base import AttentionMetadata


@dataclass
class ForwardContext:
    attn_metadata: AttentionMetadata


_current: ForwardContext | None = None


def get_forward_context() -> ForwardContext:
    if _current is None:
        raise EngineError("no forward context set: run the model through the ModelRunner")
    return _current


@contextmanager
def forward_context(meta: AttentionMetadata) -> Iterator[ForwardContext]:
    """Make ``meta`` the current step's attention metadata for the duration of the block."""
    global _current
    previous, _current = _current, ForwardContext(meta)
    try:
        yield _current
    finally:
        _current = previous
