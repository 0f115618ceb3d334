"""The codes the contract names: error codes of ``error`` results and finish reasons."""

from __future__ import annotations

from enum import Enum


class ErrorCode(str, Enum):
    """Codes carried by ``error`` results and :class:`producer.errors.ProtocolError`."""

    INVALID_REQUEST = "invalid_request"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    UNSUPPORTED_VERSION = "unsupported_version"
    PROMPT_TOO_LONG = "prompt_too_long"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    CANCELLED = "cancelled"
    QUEUE_FULL = "queue_full"
    ID_IN_USE = "id_in_use"
    IDEMPOTENCY_MISMATCH = "idempotency_mismatch"
    NOT_OWNER = "not_owner"
    DEAD_LETTER = "dead_letter"
    MODEL_NOT_FOUND = "model_not_found"
    INTERNAL = "internal"


FINISH_REASONS = ("stop", "length", "abort", "deadline", "tool_calls")
"""Why a ``done`` result ended: eos or a stop string, ``max_tokens``, aborted, deadline."""
