"""The queue's bounds: how much may wait in Redis, set by operators, enforced by ENQUEUE.

They live in the ``<prefix>:bounds:{q<p>}`` hash of every partition, not in any client:
ENQUEUE reads them on every call, so a client can lower its own per-model bound
(``ClientSettings.max_backlog_tokens``) but never raise one. Unset fields take ENQUEUE's
defaults (:data:`DEFAULT_BOUNDS`, pinned to ``lua/enqueue.lua`` by a test). With the ACL
file only workers and operators' tools may write the hash (``deploy/redis/users.acl.template``).
"""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass
from typing import Any

from producer.contract.keys import Keys
from producer.errors import ChatqError


@dataclass(frozen=True)
class QueueBounds:
    """``backlog_tokens``: one model's queued cost (tokens, ENQUEUE's cost rule);
    ``total_tokens``: all models' together; ``max_models``: models with requests queued at
    once (a flood of made-up model names stops there). An empty model backlog, or an empty
    total, still admits one request larger than the bound."""

    backlog_tokens: int = 2_000_000
    total_tokens: int = 8_000_000
    max_models: int = 256

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ChatqError(f"{name} must be a positive integer: {value!r}")


DEFAULT_BOUNDS = QueueBounds()


def bounds_fields(bounds: QueueBounds) -> dict[str, int]:
    """The hash fields ENQUEUE reads."""
    return asdict(bounds)


def write_bounds(redis: Any, keys: Keys, bounds: QueueBounds) -> Any:
    """Set the bounds in every partition (a sync or asyncio redis-py client: await the result
    of the latter). ENQUEUE gives each partition its share of the token bounds."""
    fields = bounds_fields(bounds)
    replies = [redis.hset(keys.bounds(p), mapping=fields) for p in keys.all_partitions()]
    if len(replies) == 1 or not inspect.isawaitable(replies[0]):
        return replies[0] if len(replies) == 1 else replies

    async def each() -> list[Any]:
        return [await reply for reply in replies]

    return each()


def read_bounds(fields: dict[Any, Any]) -> QueueBounds:
    """The bounds in force, from an HGETALL of the bounds hash (defaults where unset)."""
    values = {(k.decode() if isinstance(k, bytes) else str(k)): int(v) for k, v in fields.items()}
    return QueueBounds(**{**bounds_fields(DEFAULT_BOUNDS), **values})
