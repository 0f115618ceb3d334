"""Every Redis key name chatq uses, and how long each lives.

One place for the layout in ``DESIGN.md``; producer and workers both build names here.
"""

from __future__ import annotations

from dataclasses import dataclass

PRIORITIES: tuple[str, ...] = ("high", "normal", "low")
"""Priority lanes, highest first. Each lane is its own request stream."""

GROUP = "workers"
"""Consumer group every worker joins on every request stream."""

STREAM_FIELD = "m"
"""Field of a request-stream entry holding the msgpack envelope."""

# Result streams outlive the request long enough for a slow client to read the answer,
# but not forever: 1 hour after the last write.
RESULT_TTL_S = 3600
# A worker's heartbeat key expires this long after its last beat; a worker beats every
# HEARTBEAT_INTERVAL_S, so a missing key means the process is gone (or stalled > TTL).
HEARTBEAT_TTL_S = 2
HEARTBEAT_INTERVAL_S = 0.5
# Idempotency keys map to a request id for as long as the result is kept: a retry within
# that window gets the same id and can still read the answer.
IDEMPOTENCY_TTL_S = RESULT_TTL_S
# A cancel marker only needs to outlive the request it cancels.
CANCELLED_TTL_S = 86_400
# The cancel stream only needs to outlive running requests; it is trimmed by length.
CANCEL_MAXLEN = 10_000
# The dead-letter stream keeps the newest entries only.
DEAD_MAXLEN = 100_000


@dataclass(frozen=True)
class Keys:
    """Key names under one prefix (``chatq`` by default)."""

    prefix: str = "chatq"

    def requests(self, model: str, priority: str) -> str:
        return f"{self.prefix}:req:{model}:{priority}"

    def request_lanes(self, model: str) -> list[str]:
        return [self.requests(model, p) for p in PRIORITIES]

    def result(self, request_id: str) -> str:
        return f"{self.prefix}:res:{request_id}"

    def heartbeat(self, worker: str) -> str:
        return f"{self.prefix}:hb:{worker}"

    def heartbeat_pattern(self) -> str:
        return f"{self.prefix}:hb:*"

    @property
    def dead(self) -> str:
        return f"{self.prefix}:dead"

    def idempotency(self, key: str) -> str:
        return f"{self.prefix}:idem:{key}"

    def backlog(self, model: str) -> str:
        return f"{self.prefix}:backlog:{model}"

    def backlog_pattern(self) -> str:
        return f"{self.prefix}:backlog:*"

    @property
    def cancel(self) -> str:
        return f"{self.prefix}:cancel"

    def final(self, request_id: str) -> str:
        """Marker set once a request has its final (done/error) result: effectively-once."""
        return f"{self.prefix}:final:{request_id}"

    def cancelled(self, request_id: str) -> str:
        """Marker set by ``cancel``; intake skips a queued request that has it."""
        return f"{self.prefix}:cancelled:{request_id}"

    @property
    def models(self) -> str:
        """Set of model names that have ever had a request queued (for ``chatq status``)."""
        return f"{self.prefix}:models"
