"""Typed settings for the producer side, with an environment constructor."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from producer.errors import ChatqError
from producer.protocol import Limits

DEFAULT_REDIS_URL = "redis://localhost:6379/0"


@dataclass(frozen=True)
class ClientSettings:
    """What a :class:`producer.client.ChatClient` needs.

    ``max_backlog_tokens`` bounds the queued cost (prompt estimate + max_tokens) per model;
    past it, submit raises ``QueueFull`` with a retry hint from the measured drain rate.
    """

    redis_url: str = DEFAULT_REDIS_URL
    prefix: str = "chatq"
    max_backlog_tokens: int = 2_000_000
    limits: Limits = field(default_factory=Limits)
    socket_timeout_s: float | None = None

    def __post_init__(self) -> None:
        if not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ChatqError(
                f"redis_url must be redis://, rediss:// or unix://: {self.redis_url!r}"
            )
        if not self.prefix or ":" in self.prefix:
            raise ChatqError(f"prefix must be non-empty and contain no ':': {self.prefix!r}")
        if self.max_backlog_tokens <= 0:
            raise ChatqError("max_backlog_tokens must be positive")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> ClientSettings:
        """Read ``CHATQ_REDIS_URL``, ``CHATQ_PREFIX`` and ``CHATQ_MAX_BACKLOG_TOKENS``."""
        env = os.environ if environ is None else environ
        try:
            max_backlog = int(env.get("CHATQ_MAX_BACKLOG_TOKENS", cls.max_backlog_tokens))
        except ValueError as err:
            raise ChatqError("CHATQ_MAX_BACKLOG_TOKENS must be an integer") from err
        return cls(
            redis_url=env.get("CHATQ_REDIS_URL", DEFAULT_REDIS_URL),
            prefix=env.get("CHATQ_PREFIX", "chatq"),
            max_backlog_tokens=max_backlog,
        )
