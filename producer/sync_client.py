"""The blocking client backend services use: submit chats, wait for or stream results, cancel.

A thin layer over redis-py's sync client: the request is validated and encoded before Redis is
touched, enqueued with one atomic Lua call (ENQUEUE, ``docs/protocol.md``: idempotency,
backlog cost and bound, XADD; ``submit_many``: many requests in one such call), and results
are read by blocking XREAD on the request's result stream (``results_many``: one XREAD over
many streams), never a polling loop. Same methods as :class:`producer.client.ChatClient`; both share
:mod:`producer.calls`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Any, Literal, overload

import redis

from producer.batch import (
    BatchRequest,
    ResultsWindow,
    build_batch,
    raise_first,
)
from producer.calls import (
    DEFAULT_RESULT_TIMEOUT_S,
    DEFAULT_STREAM_IDLE_TIMEOUT_S,
    READ_COUNT,
    ChatResult,
    Messages,
    ResultCursor,
    block_ms,
    build_envelope,
    check_request_id,
    new_id_for,
    redis_errors,
    resolve_settings,
    stream_entries,
)
from producer.connection import connect_sync, xread_any_sync
from producer.contract.cancel import CancelOutcome, cancel_call, cancel_outcome, check_token
from producer.contract.enqueue import (
    EnqueueCall,
    by_partition,
    each_outcome,
    enqueue_call,
    enqueue_outcome,
    request_partition,
)
from producer.contract.envelope import RequestId
from producer.contract.keys import Keys
from producer.contract.options import SubmitOptions
from producer.contract.scripts import CANCEL, ENQUEUE
from producer.errors import ChatqError, ResultTimeout
from producer.retry import RetryPolicy, retrying_sync
from producer.settings import ClientSettings


class SyncChatClient:
    """Blocking twin of :class:`ChatClient` on redis-py's sync client (``with ... as c``)."""

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        prefix: str | None = None,
        settings: ClientSettings | None = None,
        allow_unserved: bool | None = None,
        partitions: int | None = None,
    ) -> None:
        """``allow_unserved``: queue for models no live worker serves (default: refuse
        with :class:`ModelNotServed`; see :class:`ClientSettings`). ``partitions``: the
        deployment's (``ClientSettings.partitions``)."""
        self.settings = resolve_settings(redis_url, prefix, settings, allow_unserved, partitions)
        self.keys = Keys(self.settings.prefix, self.settings.partitions)
        self.redis: redis.Redis = connect_sync(
            self.settings.redis_url, socket_timeout=self.settings.socket_timeout_s
        )
        self._enqueue = self.redis.register_script(ENQUEUE)
        self._cancel = self.redis.register_script(CANCEL)

    def __enter__(self) -> SyncChatClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self.redis.close()

    def submit(
        self,
        messages: Messages,
        options: SubmitOptions | None = None,
        **kwargs: Any,
    ) -> RequestId:
        """See :meth:`ChatClient.submit`."""
        request_id = kwargs.pop("request_id", None)
        env, payload = build_envelope(self.settings, messages, options, kwargs, request_id)
        call = enqueue_call(
            self.keys,
            self.settings.max_backlog_tokens,
            [(env, payload)],
            each=True,
            allow_unserved=self.settings.allow_unserved,
            partition=request_partition(self.keys, env),
        )
        with redis_errors():
            reply = self._enqueue(keys=call.keys, args=call.args)
        (outcome,) = each_outcome(reply, call)
        if isinstance(outcome, ChatqError):  # QueueFull, ModelNotServed
            raise outcome
        return outcome

    def submit_retrying(
        self,
        messages: Messages,
        options: SubmitOptions | None = None,
        *,
        policy: RetryPolicy | None = None,
        **kwargs: Any,
    ) -> RequestId:
        """See :meth:`ChatClient.submit_retrying`."""
        request_id = kwargs.pop("request_id", None) or new_id_for(
            self.settings, messages, options, kwargs
        )
        return retrying_sync(
            lambda: self.submit(messages, options, request_id=request_id, **kwargs),
            policy or RetryPolicy(),
        )

    def submit_many(
        self,
        requests: Sequence[BatchRequest],
        options: SubmitOptions | None = None,
        **defaults: Any,
    ) -> list[RequestId]:
        """See :meth:`ChatClient.submit_many`."""
        encoded = build_batch(self.settings, requests, options, defaults)
        out: list[RequestId] = []
        slots: list[int] = []
        for partition, indexes in by_partition(self.keys, [env for env, _ in encoded]).items():
            call = enqueue_call(
                self.keys,
                self.settings.max_backlog_tokens,
                [encoded[i] for i in indexes],
                allow_unserved=self.settings.allow_unserved,
                partition=partition,
            )
            out += self._send(call)
            slots += indexes
        ids = list(out)
        for slot, request_id in zip(slots, out, strict=True):
            ids[slot] = request_id
        return ids

    def result(self, request_id: str, timeout_s: float = DEFAULT_RESULT_TIMEOUT_S) -> ChatResult:
        """See :meth:`ChatClient.result`."""
        cursor = ResultCursor(check_request_id(request_id))
        deadline = time.monotonic() + timeout_s
        while cursor.final is None:
            if self._read(cursor, deadline) is None:
                raise ResultTimeout(f"no result for {request_id} within {timeout_s} s")
        return cursor.outcome()

    def stream(
        self,
        request_id: str,
        *,
        from_index: int = 0,
        timeout_s: float = DEFAULT_STREAM_IDLE_TIMEOUT_S,
    ) -> Iterator[str]:
        """See :meth:`ChatClient.stream`."""
        cursor = ResultCursor(check_request_id(request_id), from_index)
        while cursor.final is None:
            deltas = self._read(cursor, time.monotonic() + timeout_s)
            if deltas is None:
                raise ResultTimeout(f"no result entry for {request_id} within {timeout_s} s")
            yield from deltas
        cursor.outcome()

    def cancel(self, request_id: str, cancel_token: str | None = None) -> CancelOutcome:
        """See :meth:`ChatClient.cancel`."""
        token = check_token(request_id, cancel_token)
        check_request_id(request_id)
        keys, args = cancel_call(self.keys, str(request_id), token)
        with redis_errors():
            reply = self._cancel(keys=keys, args=args)
        return cancel_outcome(reply, request_id)

    def chat(
        self,
        messages: Messages,
        options: SubmitOptions | None = None,
        *,
        timeout_s: float = DEFAULT_RESULT_TIMEOUT_S,
        **kwargs: Any,
    ) -> ChatResult:
        """See :meth:`ChatClient.chat`."""
        return self.result(self.submit(messages, options, **kwargs), timeout_s=timeout_s)

    @overload
    def results_many(
        self,
        request_ids: Sequence[str],
        timeout_s: float = ...,
        *,
        return_exceptions: Literal[False] = ...,
    ) -> list[ChatResult]: ...

    @overload
    def results_many(
        self, request_ids: Sequence[str], timeout_s: float = ..., *, return_exceptions: bool
    ) -> list[ChatResult | ChatqError]: ...

    def results_many(
        self,
        request_ids: Sequence[str],
        timeout_s: float = DEFAULT_RESULT_TIMEOUT_S,
        *,
        return_exceptions: bool = False,
    ) -> list[ChatResult] | list[ChatResult | ChatqError]:
        """See :meth:`ChatClient.results_many`."""
        window = ResultsWindow(self.keys, request_ids)
        deadline = time.monotonic() + timeout_s
        while not window.done:
            wait_ms = block_ms(deadline, self.settings.socket_timeout_s)
            with redis_errors():
                reply = xread_any_sync(
                    self.redis, window.streams(), count=READ_COUNT, block=wait_ms
                )
            if reply:
                window.feed(reply)
            elif time.monotonic() >= deadline:
                break
        outcomes = window.outcomes(timeout_s)
        return outcomes if return_exceptions else raise_first(outcomes)

    @overload
    def chat_many(
        self,
        requests: Sequence[BatchRequest],
        options: SubmitOptions | None = ...,
        *,
        timeout_s: float = ...,
        return_exceptions: Literal[False] = ...,
        **defaults: Any,
    ) -> list[ChatResult]: ...

    @overload
    def chat_many(
        self,
        requests: Sequence[BatchRequest],
        options: SubmitOptions | None = ...,
        *,
        timeout_s: float = ...,
        return_exceptions: bool,
        **defaults: Any,
    ) -> list[ChatResult | ChatqError]: ...

    def chat_many(
        self,
        requests: Sequence[BatchRequest],
        options: SubmitOptions | None = None,
        *,
        timeout_s: float = DEFAULT_RESULT_TIMEOUT_S,
        return_exceptions: bool = False,
        **defaults: Any,
    ) -> list[ChatResult] | list[ChatResult | ChatqError]:
        """See :meth:`ChatClient.chat_many`."""
        request_ids = self.submit_many(requests, options, **defaults)
        return self.results_many(request_ids, timeout_s, return_exceptions=return_exceptions)

    def _send(self, call: EnqueueCall) -> list[RequestId]:
        with redis_errors():
            reply = self._enqueue(keys=call.keys, args=call.args)
        return enqueue_outcome(reply, call)

    def _read(self, cursor: ResultCursor, deadline: float) -> list[str] | None:
        key = self.keys.result(cursor.request_id)
        while True:
            wait_ms = block_ms(deadline, self.settings.socket_timeout_s)
            with redis_errors():
                reply = self.redis.xread({key: cursor.last_id}, count=READ_COUNT, block=wait_ms)
            entries = stream_entries(reply)
            if entries:
                return cursor.feed(entries)
            if time.monotonic() >= deadline:
                return None
