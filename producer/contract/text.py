"""Redis replies as text: redis-py gives bytes (or str with ``decode_responses``)."""

from __future__ import annotations

from typing import Any


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
