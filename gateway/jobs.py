"""Jobs: chats queued over HTTP by callers that don't hold a connection.

A job is an ordinary request (queued with ``stream=True``, so its text can be followed as
it is generated) plus a record of who owns it (``Keys.job``), kept as long as its result.
Its state is read from its result stream: a final entry (done / error), else chunks
(running), else nothing yet (queued). A tenant sees and cancels only its own jobs: anyone
else gets the same 404 as for an id that never existed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from gateway.errors import Code, GatewayError, worker_code
from gateway.responses import completion
from producer.calls import ChatResult
from producer.contract.keys import Keys
from producer.contract.results import Chunk, Done, Error, decode_result


@dataclass(frozen=True)
class JobRecord:
    """Who owns a job (the tenant that created it), for which model, since when."""

    request_id: str
    tenant: str
    model: str
    created_s: int
    cancel_token: str = ""  # kept for the owner's cancel (only its SHA-1 is in the queue)


@dataclass(frozen=True)
class JobState:
    """Where a job is: ``queued``, ``running``, ``done``, ``error`` or ``cancelled``."""

    record: JobRecord
    status: str
    result: ChatResult | None = None
    error: Error | None = None

    def to_json(self) -> dict[str, Any]:
        r = self.record
        error = None
        if self.error is not None:
            error = {"code": worker_code(self.error.code).value, "message": self.error.message}
        return {
            "id": r.request_id,
            "object": "chat.completion.job",
            "status": self.status,
            "created": r.created_s,
            "model": r.model,
            "result": None
            if self.result is None
            # A job record does not keep its options: logprobs when the result has some.
            else completion(self.result, r.model, r.created_s, bool(self.result.logprobs)),
            "error": error,
        }


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class JobStore:
    """Job records and states (a thin layer over redis.asyncio)."""

    def __init__(self, redis: Redis, keys: Keys, ttl_s: int) -> None:
        self.redis = redis
        self.keys = keys
        self.ttl_s = ttl_s

    async def create(
        self, request_id: str, tenant: str, model: str, cancel_token: str = ""
    ) -> JobRecord:
        """Record the owner of a queued request and its cancel token (kept if it exists: an
        idempotent replay, which holds no token of its own)."""
        key = self.keys.job(request_id)
        record = JobRecord(request_id, tenant, model, int(time.time()), cancel_token)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hsetnx(key, "tenant", tenant)
        pipe.hsetnx(key, "model", model)
        pipe.hsetnx(key, "created_s", str(record.created_s))
        if cancel_token:
            pipe.hsetnx(key, "cancel_token", cancel_token)
        pipe.expire(key, self.ttl_s, nx=True)
        pipe.hgetall(key)
        *_, stored = await pipe.execute()
        return _record(request_id, stored) or record

    async def owned(self, request_id: str, tenant: str) -> JobRecord:
        """The job's record if ``tenant`` owns it; 404 otherwise (unknown or not theirs)."""
        raw = await self.redis.hgetall(self.keys.job(request_id))  # type: ignore[misc]
        record = _record(request_id, raw)
        if record is None or record.tenant != tenant:
            raise GatewayError(Code.NOT_FOUND, f"no job {request_id!r}", param="id")
        return record

    async def state(self, record: JobRecord) -> JobState:
        last = await self.redis.xrevrange(self.keys.result(record.request_id), count=1)
        if not last:
            return JobState(record, "queued")
        entry = decode_result(last[0][1])
        if isinstance(entry, Chunk):
            return JobState(record, "running")
        if isinstance(entry, Done):
            return JobState(record, "done", result=ChatResult.from_done(record.request_id, entry))
        status = "cancelled" if entry.code == "cancelled" else "error"
        return JobState(record, status, error=entry)


def _record(request_id: str, raw: dict[Any, Any]) -> JobRecord | None:
    fields = {_s(k): _s(v) for k, v in raw.items()}
    if "tenant" not in fields:
        return None
    return JobRecord(
        request_id,
        fields["tenant"],
        fields.get("model", ""),
        int(fields.get("created_s", "0")),
        fields.get("cancel_token", ""),
    )
