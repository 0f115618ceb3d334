"""The calls that end a request entry: FINALIZE_MANY's batched layout and the dead letters.

Every final result goes through FINALIZE's body (write-if-absent + XACK + XDEL + backlog
release, one Lua call), so a request is answered effectively once however many workers
touch it, and the backlog cost an entry was charged (:func:`charged_cost`) is given back
exactly once, by the call that acks it. :class:`FinalBatch` lays out many finals for one
FINALIZE_MANY call; :func:`dead_letter_fields` is the entry both dead-letter scripts add to
``<prefix>:dead``; REQUEUE hands an entry back with its charge.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from producer.contract.envelope import Envelope
from producer.contract.keys import COST_FIELD, DEAD_MAXLEN, GROUP, RESULT_TTL_S, Keys
from producer.contract.webhook_job import JOB_KEY_PREFIX, encode_job

# Per final in FINALIZE_MANY's KEYS: result, final marker, lane, backlog, then the two the
# gateway's requests need: the webhook's arq job key, the tenant's in-flight set. Where a
# request has none, the slot repeats its result key: Redis checks every KEYS name against the
# caller's ACL, and an empty name matches no pattern. One more key ends KEYS: the webhook queue.
FINAL_KEYS = 6
# Per final in its ARGV: group, entry id, type, body, TTL, cost tokens, request id, the
# webhook job ("" for none: encode_job's bytes), the index of the request's last chunk (-1:
# none). One more ends ARGV: the consumer that must hold every entry ("" for none), the
# fence against a worker that lost its entries.
FINAL_ARGS = 9
_LAST_CHUNK = 8  # where a final's last chunk index sits among its ARGV
MAX_FINALS_PER_CALL = 256  # bounds one script's run time (Redis is single-threaded)
FENCED = 2  # FINALIZE_MANY's reply for a final whose entry is not pending on the consumer
CHUNKS_MISSING = 3  # its reply for a final whose stream lacks its last chunk (not written)


@dataclass(frozen=True)
class FinalHooks:
    """What else a final does for a request that asks for it: queue its webhook (the
    request's ``callback_url``; :mod:`producer.contract.webhook_job`), free its slot in its
    tenant's in-flight set (the gateway counts requests there), keep its result longer."""

    callback_url: str | None = None
    tenant: str | None = None
    model: str = ""
    result_ttl_s: int = RESULT_TTL_S

    @classmethod
    def of(cls, env: Envelope) -> FinalHooks | None:
        """The hooks an envelope asks for; None when it asks for none (the common case)."""
        if env.callback_url is None and env.tenant is None and env.result_ttl_s is None:
            return None
        return cls(env.callback_url, env.tenant, env.model, env.result_ttl_s or RESULT_TTL_S)


_COST = COST_FIELD.encode()


def charged_cost(fields: Mapping[bytes, bytes]) -> int:
    """The backlog cost ENQUEUE charged for a request-stream entry (its ``c`` field); 0 for
    an entry without one (not added by ENQUEUE: nothing was charged)."""
    raw = fields.get(_COST)
    if raw is None:
        return 0
    try:
        cost = int(raw)
    except ValueError:
        return 0
    return cost if cost >= 0 else 0


class FinalBatch:
    """FINALIZE_MANY's KEYS and ARGV for the finals queued so far (flat lists)."""

    def __init__(self, keys: Keys, consumer: str = "") -> None:
        """``consumer``: finals only land while their entry is pending on it ("" for any)."""
        # With one partition, key names per request are prefix + id (checked here, built by
        # concatenation); with more they carry the tag of the id's partition.
        self._result_prefix = keys.result("")
        self._final_prefix = keys.final("")
        self._concat = keys.partitions == 1
        if self._concat:
            assert keys.result("x") == self._result_prefix + "x"
            assert keys.final("x") == self._final_prefix + "x"
        self._names = keys
        self.consumer = consumer
        self.keys: list[Any] = []
        self.args: list[Any] = []

    def __len__(self) -> int:
        return len(self.args) // FINAL_ARGS

    def add(
        self,
        request_id: str,
        lane: str,
        entry_id: str,
        backlog: str,
        kind: str,
        body: bytes,
        cost_tokens: int,
        hooks: FinalHooks | None = None,
    ) -> None:
        """One final: ``kind`` is ``done`` or ``error``, ``body`` its msgpack body; what
        else it does when it is the one written, per ``hooks``."""
        if self._concat:
            result, final = self._result_prefix + request_id, self._final_prefix + request_id
        else:
            result, final = self._names.result(request_id), self._names.final(request_id)
        if hooks is None:
            self.keys += (result, final, lane, backlog, result, result)
            self.args += (GROUP, entry_id, kind, body, RESULT_TTL_S, cost_tokens, request_id, "",
                          -1)  # fmt: skip
            return
        job_key, job = result, b""
        if hooks.callback_url is not None:
            job_key = JOB_KEY_PREFIX + self._names.webhook_job_id(request_id)
            job = encode_job(request_id, hooks.callback_url, hooks.tenant, hooks.model, kind,
                             body, time.time_ns() // 1_000_000)  # fmt: skip
        inflight = result if hooks.tenant is None else self._names.tenant_inflight(hooks.tenant)
        self.keys += (result, final, lane, backlog, job_key, inflight)
        self.args += (GROUP, entry_id, kind, body, hooks.result_ttl_s, cost_tokens, request_id,
                      job, -1)  # fmt: skip

    def entries(self) -> set[tuple[str, str]]:
        """(lane, entry id) of each final queued: pending in Redis until it lands."""
        return {
            (self.keys[FINAL_KEYS * i + 2], self.args[FINAL_ARGS * i + 1]) for i in range(len(self))
        }

    def request_ids(self) -> list[str]:
        """The request id of each final queued."""
        return [self.args[FINAL_ARGS * i + 6] for i in range(len(self))]

    def note_last_chunks(self, next_index: Mapping[str, int]) -> None:
        """Give each final not told yet the index of its request's last chunk (the one
        before ``next_index[request id]``; requests not there streamed none): FINALIZE_MANY
        writes a final only behind it."""
        for i in range(len(self)):
            at = FINAL_ARGS * i
            nxt = next_index.get(self.args[at + 6])
            if nxt is not None and self.args[at + _LAST_CHUNK] == -1:
                self.args[at + _LAST_CHUNK] = nxt - 1

    def select(self, indexes: Sequence[int]) -> FinalBatch:
        """A batch of the finals at ``indexes`` (in that order); this one is left as is."""
        keys: list[Any] = []
        args: list[Any] = []
        for i in indexes:
            keys += self.keys[FINAL_KEYS * i : FINAL_KEYS * (i + 1)]
            args += self.args[FINAL_ARGS * i : FINAL_ARGS * (i + 1)]
        return self._like(keys, args)

    def take(self) -> FinalBatch:
        """Everything queued so far, as a new batch; this one is left empty."""
        taken = self._like(self.keys, self.args)
        self.keys, self.args = [], []
        return taken

    def _like(self, keys: list[Any], args: list[Any]) -> FinalBatch:
        """A batch laid out as this one, holding ``keys`` and ``args``."""
        out = object.__new__(FinalBatch)
        out.__dict__.update(self.__dict__)
        out.keys, out.args = keys, args
        return out

    def put_back(self, taken: FinalBatch) -> None:
        """Queue ``taken``'s finals again, before the ones queued since."""
        self.keys = taken.keys + self.keys
        self.args = taken.args + self.args

    def calls(self) -> Iterator[tuple[list[Any], list[Any]]]:
        """(KEYS, ARGV) of each FINALIZE_MANY call: the finals of one partition at a time
        (a call touches one hash slot), at most MAX_FINALS_PER_CALL each. A call's last key
        is the webhook queue where one of its finals queues a webhook, else its first result
        key (unused: no key of another slot)."""
        for finals in self._groups():
            keys: list[Any] = []
            args: list[Any] = []
            for i in finals:
                keys += self.keys[i * FINAL_KEYS : (i + 1) * FINAL_KEYS]
                args += self.args[i * FINAL_ARGS : (i + 1) * FINAL_ARGS]
            hooked = any(args[FINAL_ARGS * k + 7] for k in range(len(finals)))
            queue = self._names.webhook_queue if hooked else keys[0]
            yield [*keys, queue], [*args, self.consumer]

    def replies(self, call_replies: Sequence[Any]) -> list[Any]:
        """Each final's reply, in batch order, from the replies of :meth:`calls`' calls (a
        call Redis refused whole gives each of its finals that error)."""
        out: list[Any] = [None] * len(self)
        for finals, reply in zip(self._groups(), call_replies, strict=True):
            for k, i in enumerate(finals):
                out[i] = reply[k] if isinstance(reply, list) else reply
        return out

    def num_calls(self) -> int:
        """How many FINALIZE_MANY calls :meth:`calls` makes."""
        return len(self._groups())

    def _groups(self) -> list[list[int]]:
        """Indexes of the queued finals per call: by partition (of the lane), in order."""
        by_partition: dict[int, list[int]] = {}
        for i in range(len(self)):
            lane = self.keys[FINAL_KEYS * i + 2]
            partition = 0 if self._concat else self._names.partition_in(lane)
            by_partition.setdefault(partition, []).append(i)
        return [
            finals[start : start + MAX_FINALS_PER_CALL]
            for finals in by_partition.values()
            for start in range(0, len(finals), MAX_FINALS_PER_CALL)
        ]


def requeue_call(
    keys: Keys,
    model: str,
    request_id: str,
    lane: str,
    entry_id: str,
    consumer: str,
    envelope: bytes,
    cost_tokens: int,
) -> tuple[list[Any], list[Any]]:
    """(KEYS, ARGV) of REQUEUE: hand a held entry back to the end of its lane (its id's
    reservation follows it to the new entry)."""
    return (
        [
            lane,
            keys.final(request_id),
            keys.backlog(model, keys.partition_in(lane)),
            keys.reservation(request_id),
        ],
        [GROUP, entry_id, consumer, envelope, cost_tokens],
    )


def dead_letter_fields(
    *,
    request_id: str,
    model: str,
    lane: str,
    entry_id: str,
    reason: str,
    deliveries: int,
    worker: str,
    ts_ms: int,
    payload: bytes,
    dead_worker: str | None = None,
) -> list[Any]:
    """The field/value pairs of one ``<prefix>:dead`` entry (``request_id`` "" when the
    envelope could not be read; ``dead_worker``: the holder that died, for reclaims)."""
    fields: list[Any] = [
        "id", request_id, "model", model, "stream", lane, "entry_id", entry_id,
        "reason", reason, "deliveries", deliveries, "worker", worker,
    ]  # fmt: skip
    if dead_worker is not None:
        fields += ("dead_worker", dead_worker)
    fields += ("ts_ms", ts_ms, "payload", payload)
    return fields


def dead_letter_raw_call(
    keys: Keys,
    model: str,
    lane: str,
    entry_id: str,
    consumer: str,
    cost_tokens: int | None,
    fields: list[Any],
) -> tuple[list[Any], list[Any]]:
    """(KEYS, ARGV) of DEAD_LETTER_RAW for an entry nobody can answer; ``cost_tokens`` None
    for one ENQUEUE never charged (nothing is given back)."""
    cost: int | str = "" if cost_tokens is None else cost_tokens
    partition = keys.partition_in(lane)
    return (
        [lane, keys.dead(partition), keys.backlog(model, partition)],
        [GROUP, entry_id, DEAD_MAXLEN, consumer, cost, *fields],
    )


def dead_letter_call(
    keys: Keys,
    request_id: str,
    model: str,
    lane: str,
    entry_id: str,
    consumer: str,
    error_body: bytes,
    cost_tokens: int,
    fields: list[Any],
    result_ttl_s: int = RESULT_TTL_S,
) -> tuple[list[Any], list[Any]]:
    """(KEYS, ARGV) of DEAD_LETTER: the dead letter and the request's ``error`` final."""
    partition = keys.partition_in(lane)
    return (
        [keys.result(request_id), keys.final(request_id), lane, keys.backlog(model, partition),
         keys.dead(partition)],
        [GROUP, entry_id, "error", error_body, result_ttl_s, cost_tokens, DEAD_MAXLEN, consumer,
         *fields],
    )  # fmt: skip
