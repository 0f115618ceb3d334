"""The pure halves of enqueueing and awaiting requests, for one request or many at a time.

Shared by :class:`producer.client.ChatClient` and :class:`producer.sync_client.SyncChatClient`
(like :mod:`producer.calls`). ``submit`` is a batch of one; ``submit_many`` sends up to
:data:`MAX_BATCH_REQUESTS` requests in one :data:`producer.scripts.ENQUEUE` call, all or
nothing: every request is validated before Redis is touched (the first bad one raises
:class:`ProtocolError` naming ``requests[i].<field>``), and either every request is queued
(or resolved to the id its known idempotency key maps to) or, when a model's backlog bound
would be passed, none is and :class:`QueueFull` says when the whole batch fits.
``results_many`` waits for many results with one blocking XREAD over up to
:data:`RESULTS_WINDOW` result streams at a time instead of one XREAD per request.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from producer.calls import (
    ChatResult,
    ResultCursor,
    build_envelope,
    check_request_id,
    retry_after_s,
    streams_entries,
    text,
)
from producer.errors import ChatqError, ProtocolError, QueueFull, RequestFailed, ResultTimeout
from producer.keys import IDEMPOTENCY_TTL_S, STREAM_FIELD, Keys
from producer.protocol import Envelope, ErrorCode, Message, estimate_cost_tokens
from producer.settings import ClientSettings

# One ENQUEUE call runs inside Redis's single thread: ~1,000 XADDs take about a millisecond.
MAX_BATCH_REQUESTS = 1000
# Result streams one XREAD watches; the rest wait their turn (Redis answers in ~submit order).
RESULTS_WINDOW = 256

SUBMIT_OPTIONS = frozenset(
    {
        "model",
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "stop",
        "priority",
        "deadline_s",
        "idempotency_key",
        "stream",
        "ignore_eos",
        "tenant",
        "callback_url",
    }
)

Messages = Sequence[Mapping[str, str] | Message]
# One request of a batch: its messages, or a mapping with "messages" and any submit option.
BatchRequest = Messages | Mapping[str, Any]


def _invalid(field: str, message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.INVALID_REQUEST.value, message, field=field)


def build_batch(
    settings: ClientSettings, requests: Sequence[BatchRequest], defaults: Mapping[str, Any]
) -> list[tuple[Envelope, bytes]]:
    """Validate and encode every request of a ``submit_many`` call (no Redis involved).

    ``defaults`` (the call's keyword options) apply to every request; a request given as a
    mapping overrides them with its own keys."""
    if isinstance(requests, str | bytes) or not isinstance(requests, Sequence):
        raise _invalid("requests", "must be a list of requests")
    if not 1 <= len(requests) <= MAX_BATCH_REQUESTS:
        raise _invalid(
            "requests", f"has {len(requests)} requests; a batch holds 1 to {MAX_BATCH_REQUESTS}"
        )
    for name in defaults:
        if name not in SUBMIT_OPTIONS:
            raise _invalid(name, "is not a submit option")
    out: list[tuple[Envelope, bytes]] = []
    for i, request in enumerate(requests):
        options = dict(defaults)
        if isinstance(request, Mapping):
            for name, value in request.items():
                if name != "messages" and name not in SUBMIT_OPTIONS:
                    raise _invalid(f"requests[{i}].{name}", "is not a submit option")
                options[name] = value
            messages = options.pop("messages", None)
            if messages is None:
                raise _invalid(f"requests[{i}].messages", "is required")
        else:
            messages = request
        if "model" not in options:
            raise _invalid(f"requests[{i}].model", "is required")
        try:
            out.append(build_envelope(settings, messages, **options))
        except ProtocolError as err:
            where = f"requests[{i}]" + (f".{err.field}" if err.field else "")
            raise ProtocolError(err.code, err.message, field=where) from err
    return out


@dataclass(frozen=True)
class EnqueueCall:
    """KEYS and ARGV of one ENQUEUE call, and how its reply maps back to the caller's list."""

    keys: list[str]
    args: list[bytes | str | int]
    sent: list[Envelope]  # the requests in the call, in order
    slot_of: list[int]  # for each request of the caller: its index in ``sent``


def enqueue_call(
    keys: Keys,
    settings: ClientSettings,
    encoded: Sequence[tuple[Envelope, bytes]],
    *,
    each: bool = False,
) -> EnqueueCall:
    """Lay out one ENQUEUE call: all or nothing (``submit_many``), or with ``each`` every
    request on its own, as if enqueued alone in order (concurrent ``submit`` calls sent
    together). All or nothing, a request repeating an idempotency key seen earlier in the
    batch is not sent: it takes the earlier request's outcome (the key maps to one id)."""
    models: dict[str, int] = {}
    streams: dict[str, int] = {}
    idem_keys: dict[str, int] = {}
    first_with_key: dict[str, int] = {}
    sent: list[Envelope] = []
    slot_of: list[int] = []
    per_request: list[bytes | str | int] = []
    for env, payload in encoded:
        key = env.idempotency_key
        if key is not None and key in first_with_key and not each:
            slot_of.append(first_with_key[key])
            continue
        model_index = models.setdefault(env.model, len(models) + 1)
        stream_index = streams.setdefault(keys.requests(env.model, env.priority), len(streams) + 1)
        idem_index = 0
        if key is not None:
            idem_index = idem_keys.setdefault(keys.idempotency(key), len(idem_keys) + 1)
            first_with_key[key] = len(sent)
        slot_of.append(len(sent))
        sent.append(env)
        per_request += [
            payload,
            env.id,
            estimate_cost_tokens(env),
            model_index,
            stream_index,
            idem_index,
        ]
    script_keys = [keys.models, *(keys.backlog(m) for m in models), *streams, *idem_keys]
    args: list[bytes | str | int] = [
        len(models),
        len(streams),
        settings.max_backlog_tokens,
        IDEMPOTENCY_TTL_S,
        STREAM_FIELD,
        "each" if each else "all",
        *models,
        *per_request,
    ]
    return EnqueueCall(script_keys, args, sent, slot_of)


def enqueue_outcome(reply: Any, call: EnqueueCall, settings: ClientSettings) -> list[str]:
    """The request id of each request of an all-or-nothing call, or raise
    :class:`QueueFull` (nothing was queued)."""
    if int(reply[0]) == 1:
        ids = [
            env.id if int(status) == 1 else text(value)
            for (status, value), env in zip(reply[1], call.sent, strict=True)
        ]
        return [ids[slot] for slot in call.slot_of]
    raise queue_full(reply[2:], settings)


def each_outcome(reply: Any, call: EnqueueCall, settings: ClientSettings) -> list[str | QueueFull]:
    """Per request of an ``each`` call: its request id, or the :class:`QueueFull` it got."""
    out: list[str | QueueFull] = []
    for outcome, env in zip(reply[1], call.sent, strict=True):
        status = int(outcome[0])
        if status == 1:
            out.append(env.id)
        elif status == 2:
            out.append(text(outcome[1]))
        else:
            out.append(queue_full(outcome[1:], settings))
    return out


def queue_full(reply: Sequence[Any], settings: ClientSettings) -> QueueFull:
    """The :class:`QueueFull` for ENQUEUE's (queued tokens, drain rate, cost tokens)."""
    queued = int(text(reply[0]))
    rate_text = text(reply[1])
    cost = int(text(reply[2]))
    limit = settings.max_backlog_tokens
    wait_s = retry_after_s(queued, cost, limit, float(rate_text) if rate_text else 0.0)
    return QueueFull(wait_s, backlog_tokens=queued, limit_tokens=limit)


class ResultsWindow:
    """Many requests' result streams, read :data:`RESULTS_WINDOW` at a time.

    ``streams()`` gives the next XREAD's streams and ids (finished ones leave the window,
    waiting ones take their place); ``feed()`` takes the reply; ``outcomes()`` answers."""

    def __init__(self, keys: Keys, request_ids: Sequence[str]) -> None:
        if isinstance(request_ids, str) or not isinstance(request_ids, Sequence):
            raise _invalid("request_ids", "must be a list of request ids")
        self.request_ids = [check_request_id(r) for r in request_ids]
        self.cursors = {r: ResultCursor(r) for r in self.request_ids}  # one per distinct id
        self._keys = keys
        self._waiting = list(reversed(self.cursors))  # pop() takes the next in order
        self._open: dict[str, ResultCursor] = {}  # result stream key → cursor

    @property
    def done(self) -> bool:
        return not self._open and not self._waiting

    def streams(self) -> dict[Any, Any]:  # XREAD {stream key: last id}
        while len(self._open) < RESULTS_WINDOW and self._waiting:
            request_id = self._waiting.pop()
            self._open[self._keys.result(request_id)] = self.cursors[request_id]
        return {key: cursor.last_id for key, cursor in self._open.items()}

    def feed(self, reply: Any) -> None:
        for key, entries in streams_entries(reply):
            cursor = self._open.get(key)
            if cursor is None:
                continue
            cursor.feed(entries)
            if cursor.final is not None:
                del self._open[key]

    def outcomes(self, timeout_s: float) -> list[ChatResult | ChatqError]:
        """Per request id (in the caller's order): its result, or the error it ended with
        (:class:`RequestFailed`), or :class:`ResultTimeout` if no final arrived."""
        out: list[ChatResult | ChatqError] = []
        for request_id in self.request_ids:
            cursor = self.cursors[request_id]
            if cursor.final is None:
                out.append(ResultTimeout(f"no result for {request_id} within {timeout_s} s"))
                continue
            try:
                out.append(cursor.outcome())
            except RequestFailed as err:
                out.append(err)
        return out


def copy_error(err: ChatqError) -> ChatqError:
    """A new error of the same kind and message (one per caller of a shared failed call)."""
    fresh = ChatqError(str(err)) if isinstance(err, QueueFull) else type(err)(*err.args)
    fresh.__cause__ = err.__cause__ or err
    return fresh


def raise_first(outcomes: list[ChatResult | ChatqError]) -> list[ChatResult]:
    """The results, or raise the first request's error (in the caller's order)."""
    results: list[ChatResult] = []
    for outcome in outcomes:
        if isinstance(outcome, ChatqError):
            raise outcome
        results.append(outcome)
    return results
