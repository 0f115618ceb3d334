"""The pure halves of enqueueing and awaiting requests, for one request or many at a time.

Shared by :class:`producer.client.ChatClient` and :class:`producer.sync_client.SyncChatClient`
(like :mod:`producer.calls`). ``submit`` is a batch of one; ``submit_many`` sends up to
:data:`MAX_BATCH_REQUESTS` requests in one ENQUEUE call (:mod:`producer.contract.enqueue`), all or
nothing: every request is validated before Redis is touched (the first bad one raises
:class:`ProtocolError` naming ``requests[i].<field>``), and either every request is queued
(or resolved to the id its known idempotency key maps to) or, when a model's backlog bound
would be passed, none is and :class:`QueueFull` says when the whole batch fits.
``results_many`` waits for many results with one blocking XREAD over up to
:data:`RESULTS_WINDOW` result streams at a time instead of one XREAD per request.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from producer.calls import (
    ChatResult,
    Messages,
    ResultCursor,
    build_envelope,
    check_request_id,
    streams_entries,
)
from producer.contract.codes import ErrorCode
from producer.contract.envelope import Envelope
from producer.contract.keys import Keys, partition_of
from producer.contract.options import OPTION_NAMES, SubmitOptions
from producer.errors import ChatqError, ProtocolError, QueueFull, RequestFailed, ResultTimeout
from producer.settings import ClientSettings

# One ENQUEUE call runs inside Redis's single thread: ~1,000 XADDs take about a millisecond.
MAX_BATCH_REQUESTS = 1000
# Result streams one XREAD watches; the rest wait their turn (Redis answers in ~submit order).
RESULTS_WINDOW = 256

# One request of a batch: its messages, or a mapping with "messages" and any submit option.
BatchRequest = Messages | Mapping[str, Any]


def _invalid(field: str, message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.INVALID_REQUEST.value, message, field=field)


def build_batch(
    settings: ClientSettings,
    requests: Sequence[BatchRequest],
    options: SubmitOptions | None,
    defaults: Mapping[str, Any],
) -> list[tuple[Envelope, bytes]]:
    """Validate and encode every request of a ``submit_many`` call (no Redis involved).

    ``options`` and ``defaults`` (the call's keyword options) apply to every request; a
    request given as a mapping overrides them with its own keys. With several partitions the
    new ids are drawn in the first request's partition, so a batch without idempotency keys
    (or with keys of one partition) is one all-or-nothing ENQUEUE call."""
    if isinstance(requests, str | bytes) or not isinstance(requests, Sequence):
        raise _invalid("requests", "must be a list of requests")
    if not 1 <= len(requests) <= MAX_BATCH_REQUESTS:
        raise _invalid(
            "requests", f"has {len(requests)} requests; a batch holds 1 to {MAX_BATCH_REQUESTS}"
        )
    for name in defaults:
        if name not in OPTION_NAMES:
            raise _invalid(name, "is not a submit option")
    out: list[tuple[Envelope, bytes]] = []
    partition: int | None = None  # the batch's: new ids are drawn in it (one ENQUEUE call)
    for i, request in enumerate(requests):
        kwargs = dict(defaults)
        if isinstance(request, Mapping):
            kwargs.update(request)
            messages = kwargs.pop("messages", None)
            if messages is None:
                raise _invalid(f"requests[{i}].messages", "is required")
        else:
            messages = request
        try:
            out.append(build_envelope(settings, messages, options, kwargs, None, partition))
            if partition is None:
                partition = partition_of(out[-1][0].id, settings.partitions)
        except ProtocolError as err:
            where = f"requests[{i}]" + (f".{err.field}" if err.field else "")
            raise ProtocolError(err.code, err.message, field=where) from err
    return out


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
