"""The blocking client backend services use: submit chats, wait for or stream results, cancel.

A thin layer over redis-py's sync client: the request is validated and encoded before Redis is
touched, enqueued with one atomic Lua call (:data:`producer.scripts.ENQUEUE`: idempotency,
backlog bound, XADD; ``submit_many``: many requests in one such call), and results are read
by blocking XREAD on the request's result stream (``results_many``: one XREAD over many
streams), never a polling loop. Same methods as :class:`producer.client.ChatClient`; both share
:mod:`producer.calls`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Literal, overload

import redis

from producer.batch import (
    BatchRequest,
    EnqueueCall,
    ResultsWindow,
    build_batch,
    each_outcome,
    enqueue_call,
    enqueue_outcome,
    raise_first,
)
from producer.calls import (
    DEFAULT_RESULT_TIMEOUT_S,
    DEFAULT_STREAM_IDLE_TIMEOUT_S,
    READ_COUNT,
    ChatResult,
    ResultCursor,
    block_ms,
    build_envelope,
    check_request_id,
    queue_cancel,
    redis_errors,
    resolve_settings,
    stream_entries,
)
from producer.errors import ChatqError, QueueFull, ResultTimeout
from producer.keys import Keys
from producer.protocol import Message
from producer.scripts import ENQUEUE
from producer.settings import ClientSettings


class SyncChatClient:
    """Blocking twin of :class:`ChatClient` on redis-py's sync client (``with ... as c``)."""

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        prefix: str | None = None,
        settings: ClientSettings | None = None,
    ) -> None:
        self.settings = resolve_settings(redis_url, prefix, settings)
        self.keys = Keys(self.settings.prefix)
        self.redis: redis.Redis = redis.Redis.from_url(
            self.settings.redis_url, socket_timeout=self.settings.socket_timeout_s
        )
        self._enqueue = self.redis.register_script(ENQUEUE)

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
        messages: Sequence[Mapping[str, str] | Message],
        *,
        model: str,
        max_tokens: int = 256,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: str | Sequence[str] = (),
        priority: str = "normal",
        deadline_s: float | None = None,
        idempotency_key: str | None = None,
        stream: bool = False,
        ignore_eos: bool = False,
        tenant: str | None = None,
        callback_url: str | None = None,
    ) -> str:
        """See :meth:`ChatClient.submit`."""
        env, payload = build_envelope(
            self.settings,
            messages,
            model=model,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop=stop,
            priority=priority,
            deadline_s=deadline_s,
            idempotency_key=idempotency_key,
            stream=stream,
            ignore_eos=ignore_eos,
            tenant=tenant,
            callback_url=callback_url,
        )
        call = enqueue_call(self.keys, self.settings, [(env, payload)], each=True)
        with redis_errors():
            reply = self._enqueue(keys=call.keys, args=call.args)
        (outcome,) = each_outcome(reply, call, self.settings)
        if isinstance(outcome, QueueFull):
            raise outcome
        return outcome

    def submit_many(self, requests: Sequence[BatchRequest], **defaults: Any) -> list[str]:
        """See :meth:`ChatClient.submit_many`."""
        return self._send(
            enqueue_call(self.keys, self.settings, build_batch(self.settings, requests, defaults))
        )

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

    def cancel(self, request_id: str) -> bool:
        """See :meth:`ChatClient.cancel`."""
        check_request_id(request_id)
        with redis_errors():
            pipe = self.redis.pipeline(transaction=True)
            queue_cancel(pipe, self.keys, request_id)
            finished, _, _ = pipe.execute()
        return not finished

    def chat(
        self,
        messages: Sequence[Mapping[str, str] | Message],
        *,
        timeout_s: float = DEFAULT_RESULT_TIMEOUT_S,
        **kw: Any,
    ) -> ChatResult:
        """See :meth:`ChatClient.chat`."""
        return self.result(self.submit(messages, **kw), timeout_s=timeout_s)

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
                reply = self.redis.xread(window.streams(), count=READ_COUNT, block=wait_ms)
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
        *,
        timeout_s: float = ...,
        return_exceptions: Literal[False] = ...,
        **defaults: Any,
    ) -> list[ChatResult]: ...

    @overload
    def chat_many(
        self,
        requests: Sequence[BatchRequest],
        *,
        timeout_s: float = ...,
        return_exceptions: bool,
        **defaults: Any,
    ) -> list[ChatResult | ChatqError]: ...

    def chat_many(
        self,
        requests: Sequence[BatchRequest],
        *,
        timeout_s: float = DEFAULT_RESULT_TIMEOUT_S,
        return_exceptions: bool = False,
        **defaults: Any,
    ) -> list[ChatResult] | list[ChatResult | ChatqError]:
        """See :meth:`ChatClient.chat_many`."""
        request_ids = self.submit_many(requests, **defaults)
        return self.results_many(request_ids, timeout_s, return_exceptions=return_exceptions)

    def _send(self, call: EnqueueCall) -> list[str]:
        with redis_errors():
            reply = self._enqueue(keys=call.keys, args=call.args)
        return enqueue_outcome(reply, call, self.settings)

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
