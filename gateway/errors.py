"""The gateway's errors: one root, typed codes, and the one table from code to HTTP answer.

Every failure a client can see is a :class:`GatewayError` carrying a :class:`Code`; the
route layer turns it into OpenAI's error shape (``{"error": {"message", "type", "param",
"code"}}``) with the status and headers of :data:`ANSWERS`. Producer errors are converted at
the boundary (:func:`from_chatq`), by their typed codes, never by their messages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

from producer.errors import (
    ChatqError,
    ModelNotServed,
    ProtocolError,
    QueueFull,
    RedisUnavailable,
    RequestFailed,
)


class Code(str, Enum):
    """What went wrong, as clients read it in ``error.code``."""

    INVALID_REQUEST = "invalid_request"
    UNSUPPORTED_FIELD = "unsupported_field"
    INVALID_JSON = "invalid_json"
    BODY_TOO_LARGE = "body_too_large"
    CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
    INVALID_API_KEY = "invalid_api_key"
    MODEL_NOT_FOUND = "model_not_found"
    NOT_FOUND = "not_found"
    RATE_LIMIT_REQUESTS = "rate_limit_exceeded"
    RATE_LIMIT_TOKENS = "tokens_rate_limit_exceeded"
    CONCURRENCY_LIMIT = "concurrency_limit_exceeded"
    QUEUE_FULL = "queue_full"
    REDIS_UNAVAILABLE = "service_unavailable"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    CANCELLED = "cancelled"
    INTERNAL = "internal_error"


@dataclass(frozen=True)
class Answer:
    """How one code is answered: HTTP status, OpenAI error ``type``, and whether the
    official clients may retry it (``x-should-retry``; None leaves it to their rules)."""

    status: int
    type: str
    retry: bool | None = None


ANSWERS: dict[Code, Answer] = {
    Code.INVALID_REQUEST: Answer(400, "invalid_request_error"),
    Code.UNSUPPORTED_FIELD: Answer(400, "invalid_request_error"),
    Code.INVALID_JSON: Answer(400, "invalid_request_error"),
    Code.BODY_TOO_LARGE: Answer(413, "invalid_request_error"),
    Code.CONTEXT_LENGTH_EXCEEDED: Answer(400, "invalid_request_error"),
    Code.INVALID_API_KEY: Answer(401, "authentication_error"),
    Code.MODEL_NOT_FOUND: Answer(404, "invalid_request_error"),
    Code.NOT_FOUND: Answer(404, "invalid_request_error"),
    Code.RATE_LIMIT_REQUESTS: Answer(429, "requests"),
    Code.RATE_LIMIT_TOKENS: Answer(429, "tokens"),
    Code.CONCURRENCY_LIMIT: Answer(429, "requests"),
    Code.QUEUE_FULL: Answer(429, "queue_full"),
    Code.REDIS_UNAVAILABLE: Answer(503, "server_error"),
    # The deadline is the caller's own: a retry of the same request would meet it again.
    Code.DEADLINE_EXCEEDED: Answer(504, "timeout", retry=False),
    Code.CANCELLED: Answer(499, "cancelled", retry=False),
    Code.INTERNAL: Answer(500, "server_error", retry=False),
}

# Worker error codes (``producer.contract`` ErrorCode values) as the gateway answers them.
_WORKER_CODES: dict[str, Code] = {
    "invalid_request": Code.INVALID_REQUEST,
    "payload_too_large": Code.INVALID_REQUEST,
    "unsupported_version": Code.INTERNAL,
    "prompt_too_long": Code.CONTEXT_LENGTH_EXCEEDED,
    "deadline_exceeded": Code.DEADLINE_EXCEEDED,
    "cancelled": Code.CANCELLED,
    "queue_full": Code.QUEUE_FULL,
    "dead_letter": Code.INTERNAL,
    "model_not_found": Code.MODEL_NOT_FOUND,
    "internal": Code.INTERNAL,
}


class GatewayError(Exception):
    """Root of every error the gateway raises. ``param`` names the offending request field
    (OpenAI's ``error.param``); ``retry_after_s`` becomes ``Retry-After`` on a 429/503."""

    def __init__(
        self,
        code: Code,
        message: str,
        *,
        param: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        self.code = code
        self.message = message
        self.param = param
        self.retry_after_s = retry_after_s
        super().__init__(f"[{code.value}] {param + ': ' if param else ''}{message}")

    @property
    def answer(self) -> Answer:
        return ANSWERS[self.code]

    def body(self) -> dict[str, object]:
        """OpenAI's error object (``{"error": {...}}``)."""
        text = f"{self.param}: {self.message}" if self.param else self.message
        return {
            "error": {
                "message": text,
                "type": self.answer.type,
                "param": self.param,
                "code": self.code.value,
            }
        }

    def headers(self) -> dict[str, str]:
        """``Retry-After`` (whole seconds, as HTTP says) and ``retry-after-ms`` (what the
        official clients read first), and ``x-should-retry`` where the table says so."""
        out: dict[str, str] = {}
        if self.retry_after_s is not None:
            out["retry-after"] = str(max(1, math.ceil(self.retry_after_s)))
            out["retry-after-ms"] = str(max(1, math.ceil(self.retry_after_s * 1000)))
        if self.answer.retry is not None:
            out["x-should-retry"] = "true" if self.answer.retry else "false"
        return out


class ConfigError(GatewayError):
    """A bad setting (CLI option or ``CHATQ_*`` variable); ``param`` names it."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(Code.INVALID_REQUEST, message, param=name)


def worker_code(code: str) -> Code:
    """The gateway code for a worker's ``error`` result code (unknown codes: internal)."""
    return _WORKER_CODES.get(code, Code.INTERNAL)


def from_chatq(err: ChatqError, *, param_names: dict[str, str] | None = None) -> GatewayError:
    """Convert a producer error at the boundary. ``param_names`` maps envelope field paths
    (``params.temperature``) to the API's names (``temperature``)."""
    if isinstance(err, QueueFull):
        return GatewayError(
            Code.QUEUE_FULL,
            f"the model's queue is full ({err.backlog_tokens} of {err.limit_tokens} tokens "
            "queued); retry later",
            retry_after_s=err.retry_after_s,
        )
    if isinstance(err, ModelNotServed):  # a worker stopped since the served-models check
        return GatewayError(Code.MODEL_NOT_FOUND, str(err), param="model")
    if isinstance(err, ProtocolError):
        field = err.field
        if field is not None and param_names is not None:
            field = param_names.get(field, field)
        code = worker_code(err.code)
        return GatewayError(
            code if code is not Code.INTERNAL else Code.INVALID_REQUEST, err.message, param=field
        )
    if isinstance(err, RequestFailed):
        return GatewayError(worker_code(err.code), err.message)
    if isinstance(err, RedisUnavailable):
        return GatewayError(
            Code.REDIS_UNAVAILABLE, "the queue is unavailable; retry shortly", retry_after_s=1.0
        )
    return GatewayError(Code.INTERNAL, str(err))
