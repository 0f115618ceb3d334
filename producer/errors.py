"""Exceptions raised by the producer package; every one derives from :class:`ChatqError`."""

from __future__ import annotations


class ChatqError(Exception):
    """Root of every error the producer side raises."""


class ProtocolError(ChatqError):
    """A request or result does not follow the wire protocol.

    ``code`` is one of :class:`producer.contract.codes.ErrorCode`'s values and ``field`` names the
    offending field (dotted path, e.g. ``params.max_tokens``) when one can be named.
    """

    def __init__(self, code: str, message: str, *, field: str | None = None) -> None:
        self.code = code
        self.field = field
        prefix = f"{field}: " if field else ""
        super().__init__(f"[{code}] {prefix}{message}")
        self.message = message


class QueueFull(ChatqError):
    """The model's backlog bound (in tokens) is reached; retry after ``retry_after_s``.

    ``no_live_worker``: no live worker serves the model, so the queue does not drain and
    ``retry_after_s`` is only a guess: start a worker (the message says so)."""

    def __init__(
        self,
        retry_after_s: float,
        *,
        backlog_tokens: int = 0,
        limit_tokens: int = 0,
        model: str = "",
        no_live_worker: bool = False,
    ):
        self.retry_after_s = retry_after_s
        self.backlog_tokens = backlog_tokens
        self.limit_tokens = limit_tokens
        self.model = model
        self.no_live_worker = no_live_worker
        what = f"queue full ({backlog_tokens} of {limit_tokens} tokens queued)"
        if no_live_worker:
            super().__init__(
                f"{what}, and no live worker serves model {model!r}: nothing drains it until "
                "one starts"
            )
        else:
            super().__init__(f"{what}; retry after {retry_after_s:.2f} s")


class ModelNotServed(ChatqError):
    """No live worker serves ``model`` (``served``: the models live workers serve now), and
    the client did not opt in to queueing for it (``allow_unserved``)."""

    def __init__(self, model: str, served: list[str]) -> None:
        self.model = model
        self.served = served
        super().__init__(
            f"no live worker serves model {model!r} (served now: {', '.join(served) or 'none'}); "
            "start one (chatq worker --model ...), or pass allow_unserved=True to queue anyway"
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
