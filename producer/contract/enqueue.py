"""The ENQUEUE call: its KEYS and ARGV laid out for one request or many, and its reply read.

The script (``lua/enqueue.lua``) is the one way a request enters a request stream: it
reserves request ids (never reused), checks idempotency records per (model, tenant, key)
and body, computes each request's backlog cost from its envelope (the one place that rule
lives), checks the bounds operators set in Redis, and XADDs the envelope with its cost,
atomically, in one Lua call per submit (or per ``submit_many`` batch). Its refusal carries
a retry hint that already accounts for the callers refused before this one.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from producer.contract.codes import ErrorCode
from producer.contract.envelope import Envelope, RequestId
from producer.contract.keys import IDEMPOTENCY_TTL_S, Keys, partition_tag
from producer.contract.reservation import cancel_digest, new_cancel_token
from producer.contract.text import text
from producer.errors import ChatqError, ModelNotServed, ProtocolError, QueueFull

# The bounds ENQUEUE clamps its retry hint to (lua/enqueue.lua: MIN_RETRY_MS, MAX_RETRY_MS),
# and the jitter the client spreads it by.
MIN_RETRY_AFTER_S = 0.05
MAX_RETRY_AFTER_S = 60.0
RETRY_JITTER = 0.1
# ENQUEUE's status for a request refused because no live worker serves its model.
UNSERVED = 5


@dataclass(frozen=True)
class EnqueueCall:
    """KEYS and ARGV of one ENQUEUE call, and how its reply maps back to the caller's list."""

    keys: list[str]
    args: list[bytes | str | int]
    sent: list[Envelope]  # the requests in the call, in order
    slot_of: list[int]  # for each request of the caller: its index in ``sent``
    tokens: list[str]  # the cancel token of each request sent ("" for none)
    models: list[str]  # the call's models, by model index - 1


def cost_tokens(contents: Sequence[str], max_tokens: int, n: int = 1) -> int:
    """ENQUEUE's cost rule (``lua/enqueue.lua``, where the charge is made) in Python, for a
    caller that must know a request's charge before queueing it: the HTTP gateway counts it
    against its tenant's tokens per minute. Pinned to ENQUEUE's charge by a test. A request
    for ``n`` answers shares one prompt and may generate ``n * max_tokens`` tokens."""
    utf8_bytes = sum(len(c.encode("utf-8", "surrogatepass")) for c in contents)
    return utf8_bytes // 4 + 8 * len(contents) + n * max_tokens


def idempotency_scope(model: str, tenant: str | None, key: str) -> str:
    """The digest ENQUEUE names an idempotency record by: one per (model, tenant, key)."""
    t = tenant or ""
    scope = f"{len(model.encode())}:{model}{len(t.encode())}:{t}{key}"
    return hashlib.sha1(scope.encode("utf-8", "surrogatepass"), usedforsecurity=False).hexdigest()


def scope_partition(scope_digest: str, partitions: int) -> int:
    """The partition an idempotency scope (its digest, :func:`idempotency_scope`) belongs to:
    a retry with the same key lands where the first submit did."""
    return int(scope_digest[:8], 16) % partitions


def request_partition(keys: Keys, env: Envelope) -> int:
    """The partition a request is queued in: its id's (``Keys.partition_of``). A request with
    an idempotency key must have an id in its scope's partition (generated ids are drawn
    there: :func:`producer.contract.envelope.new_request_id`); :class:`ProtocolError`
    naming ``request_id`` otherwise."""
    partition = keys.partition_of(env.id)
    if env.idempotency_key is not None and keys.partitions > 1:
        scope = idempotency_scope(env.model, env.tenant, env.idempotency_key)
        wanted = scope_partition(scope, keys.partitions)
        if wanted != partition:
            raise ProtocolError(
                ErrorCode.INVALID_REQUEST.value,
                f"{env.id!r} is in partition {partition} of {keys.partitions}, its idempotency"
                f" key in partition {wanted}: leave the id out (one is drawn in the key's"
                " partition) or choose one in it",
                field="request_id",
            )
    return partition


def by_partition(keys: Keys, envelopes: Sequence[Envelope]) -> dict[int, list[int]]:
    """The indexes of ``envelopes`` per partition (:func:`request_partition`; the error names
    ``requests[i].request_id``), partitions in the order first seen."""
    out: dict[int, list[int]] = {}
    for i, env in enumerate(envelopes):
        try:
            partition = request_partition(keys, env)
        except ProtocolError as err:
            raise ProtocolError(err.code, err.message, field=f"requests[{i}].request_id") from err
        out.setdefault(partition, []).append(i)
    return out


def enqueue_call(
    keys: Keys,
    max_backlog_tokens: int | None,
    encoded: Sequence[tuple[Envelope, bytes]],
    *,
    each: bool = False,
    allow_unserved: bool = False,
    partition: int = 0,
) -> EnqueueCall:
    """Lay out one ENQUEUE call: all or nothing (``submit_many``), or with ``each`` every
    request on its own, as if enqueued alone in order (concurrent ``submit`` calls sent
    together). ``max_backlog_tokens`` may lower the bound Redis holds (never raise it).
    All or nothing, a request repeating an idempotency scope (model, tenant, key) seen
    earlier in the batch is not sent: it takes the earlier request's outcome (and with
    other messages, params, tools or template names it is refused, as ENQUEUE would). Each
    request sent gets a fresh cancel token. Requests for a model no live worker serves are
    refused unless ``allow_unserved``. Every request's id (and idempotency scope) must belong to
    ``partition`` (:func:`request_partition`): ENQUEUE fails the call otherwise."""
    models: dict[str, int] = {}
    first_with_key: dict[tuple[str, str | None, str], int] = {}
    sent: list[Envelope] = []
    slot_of: list[int] = []
    tokens: list[str] = []
    per_request: list[bytes | str | int] = []
    for env, payload in encoded:
        key = env.idempotency_key
        scope = (env.model, env.tenant, key) if key is not None else None
        if scope is not None and scope in first_with_key and not each:
            first = sent[first_with_key[scope]]
            if _body(first) != _body(env):
                raise refusal(4, env, f"requests[{len(slot_of)}].")
            slot_of.append(first_with_key[scope])
            continue
        model_index = models.setdefault(env.model, len(models) + 1)
        if scope is not None:
            first_with_key[scope] = len(sent)
        token = new_cancel_token()
        slot_of.append(len(sent))
        sent.append(env)
        tokens.append(token)
        per_request += [payload, model_index, cancel_digest(token)]
    script_keys = [
        keys.models(partition),
        keys.totals(partition),
        *(keys.backlog(m, partition) for m in models),
    ]
    mode = ("each" if each else "all") + (":any" if allow_unserved else ":live")
    args: list[bytes | str | int] = [
        len(models),
        max_backlog_tokens or 0,
        IDEMPOTENCY_TTL_S,
        mode,
        keys.prefix,
        partition_tag(partition),
        partition,
        keys.partitions,
        *models,
        *per_request,
    ]
    return EnqueueCall(script_keys, args, sent, slot_of, tokens, list(models))


def _body(env: Envelope) -> tuple[Any, ...]:
    """What ENQUEUE's body digest covers: what makes the answer."""
    return (env.messages, env.params, env.tools, env.tool_choice, env.chat_template_kwargs)


def enqueue_outcome(reply: Any, call: EnqueueCall) -> list[RequestId]:
    """The request id of each request of an all-or-nothing call, or raise :class:`QueueFull`,
    :class:`ModelNotServed` or :class:`ProtocolError` (nothing was queued)."""
    status = int(reply[0])
    if status == 1:
        ids = [
            _outcome(outcome, env, token)
            for outcome, env, token in zip(reply[1], call.sent, call.tokens, strict=True)
        ]
        return [ids[slot] for slot in call.slot_of]  # type: ignore[misc]
    if status == 0:
        raise queue_full(reply[2:], call.models[int(reply[1]) - 1])
    if status == UNSERVED:
        model = call.models[int(reply[1]) - 1]
        raise ModelNotServed(model, [text(name) for name in reply[2]])
    index = int(reply[1]) - 1
    raise refusal(status, call.sent[index], f"requests[{call.slot_of.index(index)}].")


def each_outcome(reply: Any, call: EnqueueCall) -> list[RequestId | ChatqError]:
    """Per request of an ``each`` call: its request id, or the error it got."""
    return [
        _outcome(outcome, env, token)
        for outcome, env, token in zip(reply[1], call.sent, call.tokens, strict=True)
    ]


def _outcome(outcome: Any, env: Envelope, token: str) -> RequestId | ChatqError:
    status = int(outcome[0])
    if status == 1:
        return RequestId(env.id, token)
    if status == 2:
        return RequestId(text(outcome[1]))  # a replay: the first submit holds the token
    if status == 0:
        return queue_full(outcome[1:], env.model)
    if status == UNSERVED:
        return ModelNotServed(env.model, [text(name) for name in outcome[1]])
    return refusal(status, env)


def refusal(status: int, env: Envelope, where: str = "") -> ProtocolError:
    """ENQUEUE's {3} (the id is in use) or {4} (the idempotency key has another body)."""
    if status == 3:
        return ProtocolError(
            ErrorCode.ID_IN_USE.value,
            f"{env.id!r} is queued, answered or was used before; ids are never reused",
            field=f"{where}request_id",
        )
    return ProtocolError(
        ErrorCode.IDEMPOTENCY_MISMATCH.value,
        "was used for a request with other messages or params (same model and tenant)",
        field=f"{where}idempotency_key",
    )


def queue_full(reply: Sequence[Any], model: str = "") -> QueueFull:
    """The :class:`QueueFull` for ENQUEUE's (queued, drain rate, cost, retry ms, bound[,
    live]), its retry hint spread by a jitter of ±:data:`RETRY_JITTER` so callers told the
    same time do not come back in lockstep. ``live`` '0': no live worker drains the queue."""
    queued = int(text(reply[0]))
    hint_s = int(reply[3]) / 1000.0
    wait_s = hint_s * random.uniform(1 - RETRY_JITTER, 1 + RETRY_JITTER)
    wait_s = min(max(wait_s, MIN_RETRY_AFTER_S), MAX_RETRY_AFTER_S)
    return QueueFull(
        wait_s,
        backlog_tokens=queued,
        limit_tokens=int(text(reply[4])),
        model=model,
        no_live_worker=len(reply) > 5 and text(reply[5]) == "0",
    )
