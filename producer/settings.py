"""Typed settings for the producer side, with an environment constructor."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from producer.connection import check_url
from producer.contract.keys import check_partitions
from producer.contract.limits import Limits
from producer.errors import ChatqError

DEFAULT_REDIS_URL = "redis://localhost:6379/0"


@dataclass(frozen=True)
class ClientSettings:
    """What a :class:`producer.client.ChatClient` needs.

    The queue's bounds live in Redis (``producer.contract.bounds``, set by operators);
    ``max_backlog_tokens`` may only lower this client's per-model bound below them (None:
    Redis's bound alone). Past a bound, submit raises ``QueueFull`` with a retry hint.
    ``allow_unserved``: queue requests for a model no live worker serves (a deployment that
    starts workers on demand, from zero); by default such a submit raises
    ``ModelNotServed`` at once. Its default comes from ``CHATQ_ALLOW_UNSERVED`` (``1``).
    ``partitions``: how many partitions the deployment splits its queue into (Redis
    Cluster: docs/reliability.md); producers and workers must agree on it.
    """

    redis_url: str = DEFAULT_REDIS_URL
    prefix: str = "chatq"
    max_backlog_tokens: int | None = None
    limits: Limits = field(default_factory=Limits)
    socket_timeout_s: float | None = None
    allow_unserved: bool = field(default_factory=lambda: _allow_unserved(os.environ))
    partitions: int = 1

    def __post_init__(self) -> None:
        check_partitions(self.partitions)
        check_url(self.redis_url)
        if not self.prefix or ":" in self.prefix:
            raise ChatqError(f"prefix must be non-empty and contain no ':': {self.prefix!r}")
        bound = self.max_backlog_tokens
        if bound is not None and (
            isinstance(bound, bool) or not isinstance(bound, int) or bound <= 0
        ):
            raise ChatqError(f"max_backlog_tokens must be a positive integer or None: {bound!r}")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> ClientSettings:
        """Read ``CHATQ_REDIS_URL``, ``CHATQ_PREFIX``, ``CHATQ_MAX_BACKLOG_TOKENS`` and
        ``CHATQ_PARTITIONS``."""
        env = os.environ if environ is None else environ
        raw = env.get("CHATQ_MAX_BACKLOG_TOKENS")
        try:
            max_backlog = None if raw is None else int(raw)
        except ValueError as err:
            raise ChatqError("CHATQ_MAX_BACKLOG_TOKENS must be an integer") from err
        return cls(
            partitions=_partitions(env),
            redis_url=env.get("CHATQ_REDIS_URL", DEFAULT_REDIS_URL),
            prefix=env.get("CHATQ_PREFIX", "chatq"),
            max_backlog_tokens=max_backlog,
            allow_unserved=_allow_unserved(env),
        )


def _partitions(env: Mapping[str, str]) -> int:
    raw = env.get("CHATQ_PARTITIONS", "1")
    try:
        return int(raw)
    except ValueError as err:
        raise ChatqError(f"CHATQ_PARTITIONS must be an integer: {raw!r}") from err


def _allow_unserved(env: Mapping[str, str]) -> bool:
    raw = env.get("CHATQ_ALLOW_UNSERVED", "0").strip().lower()
    if raw not in ("0", "1", "true", "false", "yes", "no", ""):
        raise ChatqError(f"CHATQ_ALLOW_UNSERVED must be 0 or 1: {raw!r}")
    return raw in ("1", "true", "yes")
