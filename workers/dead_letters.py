"""The dead-letter streams (``<prefix>:dead:{q<p>}``, one per partition) for operators:
list, show, requeue, drop.

A request lands there when it was delivered ``max_deliveries`` times without an answer
(it kept killing workers) or could not be read at all; its requester got a ``dead_letter``
error. Requeueing runs it again under the same request id (DEAD_REQUEUE: its old error
result goes, so the requester reads the new answer); dropping forgets it. Only the entry the
request id was reserved for is requeued: a copy someone added with raw commands (parked by
a worker, reason ``not the entry its request id was reserved for``) is refused, and the
request it names keeps its reservation and its answer.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis

from producer.contract.codec import decode_envelope
from producer.contract.enqueue import cost_tokens
from producer.contract.keys import Keys
from producer.contract.scripts import DEAD_REQUEUE
from producer.errors import ProtocolError
from workers.errors import WorkerError

NOT_RESERVED = -1
"""DEAD_REQUEUE's reply for a dead letter that is not the entry its request id was reserved
for (nothing changed)."""


@dataclass(frozen=True)
class DeadLetter:
    """One entry of the dead-letter stream."""

    entry_id: str  # its id in the dead-letter stream (what show / requeue / drop take)
    request_id: str  # "" when the envelope could not be read
    model: str
    lane: str
    reason: str
    deliveries: int
    worker: str
    ts_ms: int
    payload: bytes = field(repr=False)
    partition: int = 0  # whose dead-letter stream holds it (its request's partition)

    @classmethod
    def from_entry(cls, entry_id: Any, fields: Any, partition: int = 0) -> DeadLetter:
        f = {_s(k): v for k, v in fields.items()}
        payload = f.get("payload", b"")
        return cls(
            entry_id=_s(entry_id),
            request_id=_s(f.get("id", "")),
            model=_s(f.get("model", "")),
            lane=_s(f.get("stream", "")),
            reason=_s(f.get("reason", "")),
            deliveries=_int(f.get("deliveries")),
            worker=_s(f.get("worker", "")),
            ts_ms=_int(f.get("ts_ms")),
            payload=payload if isinstance(payload, bytes) else str(payload).encode(),
            partition=partition,
        )

    def describe(self) -> dict[str, Any]:
        """Everything about it, the request's messages and options included (``show``)."""
        out: dict[str, Any] = {
            "entry_id": self.entry_id, "request_id": self.request_id, "model": self.model,
            "lane": self.lane, "reason": self.reason, "deliveries": self.deliveries,
            "worker": self.worker, "ts_ms": self.ts_ms,
        }  # fmt: skip
        try:
            env = decode_envelope(self.payload)
        except ProtocolError as err:
            out["envelope_error"] = str(err)
            return out
        out["messages"] = [{"role": m.role, "content": m.content} for m in env.messages]
        out["params"] = {k: v for k, v in env.params.__dict__.items() if v is not None}
        out["priority"] = env.priority
        out["deadline_ms"] = env.deadline_ms
        return out


def _s(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _int(value: Any) -> int:
    try:
        return int(_s(value)) if value is not None else 0
    except ValueError:
        return 0


class DeadLetters:
    """Read and act on ``<prefix>:dead`` (a thin layer over redis.asyncio)."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self._requeue = redis.register_script(DEAD_REQUEUE)

    async def newest(self, count: int) -> list[DeadLetter]:
        """The ``count`` newest dead letters of all partitions, newest first."""
        letters: list[DeadLetter] = []
        for p in self.keys.all_partitions():
            entries = await self.redis.xrevrange(self.keys.dead(p), count=count)
            letters += [DeadLetter.from_entry(eid, fields, p) for eid, fields in entries]
        letters.sort(key=lambda d: _entry_order(d.entry_id), reverse=True)
        return letters[:count]

    async def get(self, entry_id: str) -> DeadLetter:
        """The dead letter with this stream id, or with this request id (newest first)."""
        if _looks_like_entry_id(entry_id):
            for p in self.keys.all_partitions():
                entries = await self.redis.xrange(self.keys.dead(p), entry_id, entry_id)
                if entries:
                    eid, fields = entries[0]
                    return DeadLetter.from_entry(eid, fields, p)
        async for letter in self._scan():
            if letter.request_id == entry_id:
                return letter
        raise WorkerError(f"no dead letter {entry_id!r} (chatq dead list shows them)")

    async def requeue(self, entry_id: str) -> tuple[DeadLetter, str]:
        """Queue the request again on its lane; (the letter, its new stream entry id)."""
        letter = await self.get(entry_id)
        try:
            env = decode_envelope(letter.payload)
        except ProtocolError as err:
            raise WorkerError(f"dead letter {letter.entry_id} cannot run again: {err}") from err
        cost = cost_tokens([m.content for m in env.messages], env.params.max_tokens, env.params.n)
        p = letter.partition  # the request id's, as the stream's
        lane = self.keys.requests(env.model, env.priority, p)
        new_id = await self._requeue(
            keys=[
                self.keys.dead(p), lane, self.keys.backlog(env.model, p), self.keys.final(env.id),
                self.keys.result(env.id), self.keys.models(p),
            ],
            args=[letter.entry_id, letter.payload, cost, env.model],
        )  # fmt: skip
        if new_id == NOT_RESERVED:
            raise WorkerError(
                f"dead letter {letter.entry_id} is not the entry request {env.id!r} was "
                "queued as (a copy added with raw commands?): not requeued, the request is "
                f"left as it is; chatq dead drop {letter.entry_id} removes the letter"
            )
        if not new_id:
            raise WorkerError(f"dead letter {letter.entry_id} is gone (requeued or dropped)")
        return letter, _s(new_id)

    async def drop(self, entry_id: str) -> DeadLetter:
        letter = await self.get(entry_id)
        if not await self.redis.xdel(self.keys.dead(letter.partition), letter.entry_id):
            raise WorkerError(f"dead letter {letter.entry_id} is gone (requeued or dropped)")
        if letter.model:
            backlog = self.keys.backlog(letter.model, letter.partition)
            if await self.redis.hincrby(backlog, "dead", -1) < 0:  # type: ignore[misc]
                await self.redis.hset(backlog, "dead", "0")  # type: ignore[misc]
        return letter

    async def _scan(self, page: int = 500) -> AsyncIterator[DeadLetter]:
        for p in self.keys.all_partitions():
            last = "+"
            while True:
                entries = await self.redis.xrevrange(self.keys.dead(p), max=last, count=page)
                for eid, fields in entries:
                    yield DeadLetter.from_entry(eid, fields, p)
                if len(entries) < page:
                    break
                last = "(" + _s(entries[-1][0])


def _entry_order(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms or 0), int(seq or 0)


def _looks_like_entry_id(value: str) -> bool:
    ms, _, seq = value.partition("-")
    return ms.isdigit() and seq.isdigit()
