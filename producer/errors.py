"""Exceptions raised by the producer package; every one derives from :class:`ChatqError`."""

from __future__ import annotations


class ChatqError(Exception):
    """Root of every error the producer side raises."""


class ProtocolError(ChatqError):
    """A request or result does not follow the wire protocol.

    ``code`` is one of :class:`producer.protocol.ErrorCode`'s values and ``field`` names the
    offending field (dotted path, e.g. ``params.max_tokens``) when one can be named.
    """

    def __init__(self, code: str, message: str, *, field: str | None = None) -> None:
        self.code = code
        self.field = field
        prefix = f"{field}: " if field else ""
        super().__init__(f"[{code}] {prefix}{message}")
        self.message = message


class QueueFull(ChatqError):
    """The model's backlog bound (in tokens) is reached; retry after ``retry_after_s``."""

    def __init__(self, retry_after_s: float, *, backlog_tokens: int = 0, limit_tokens: int = 0):
        self.retry_after_s = retry_after_s
        self.backlog_tokens = backlog_tokens
        self.limit_tokens = limit_tokens
        super().__init__(
            f"queue full ({backlog_tokens} of {limit_tokens} tokens queued); "
            f"retry after {retry_after_s:.2f} s"
        )


class RequestFailed(ChatqError):
    """The request ended with an ``error`` result (validation, deadline, dead letter...)."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"[{code}] {message}")


class ResultTimeout(ChatqError):
    """No final result arrived within the caller's timeout; the request may still complete."""


class RedisUnavailable(ChatqError):
    """Redis could not be reached (connection refused, reset or timed out); safe to retry."""
