"""The asyncio client backend services use: submit chats, wait for or stream results, cancel.

A thin layer over ``redis.asyncio``: the request is validated and encoded before Redis is
touched, enqueued with one atomic Lua call (:data:`producer.scripts.ENQUEUE`: idempotency,
backlog bound, XADD; ``submit_many`` queues many requests in one such call), and results are
read by blocking XREAD on the request's result stream (``results_many``: one XREAD over many
streams), never a polling loop. Concurrent ``submit`` calls share ENQUEUE calls: those made
while one is in flight go together in the next, each admitted as if enqueued alone.
:class:`producer.sync_client.SyncChatClient` has the same methods (its submits go one by one).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Literal, overload

import redis.asyncio as aioredis

from producer.batch import (
    MAX_BATCH_REQUESTS,
    BatchRequest,
    EnqueueCall,
    ResultsWindow,
    build_batch,
    copy_error,
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
from producer.connection import connect
from producer.errors import ChatqError, QueueFull, ResultTimeout
from producer.keys import Keys
from producer.protocol import Envelope, Message
from producer.scripts import ENQUEUE
from producer.settings import ClientSettings


class ChatClient:
    """``async with ChatClient("redis://...") as client: text = (await client.chat(...)).text``"""

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        prefix: str | None = None,
        settings: ClientSettings | None = None,
    ) -> None:
        self.settings = resolve_settings(redis_url, prefix, settings)
        self.keys = Keys(self.settings.prefix)
        self.redis: aioredis.Redis = connect(
            self.settings.redis_url, socket_timeout=self.settings.socket_timeout_s
        )
        self._enqueue = self.redis.register_script(ENQUEUE)
        # submit() calls made while an ENQUEUE call is in flight wait here and go together
        # in the next call, each admitted on its own (auto-pipelining, as ioredis does).
        self._queued: list[tuple[Envelope, bytes, asyncio.Future[str]]] = []
        self._sender: asyncio.Task[None] | None = None

    async def __aenter__(self) -> ChatClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._sender is not None:
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sender
        await self.redis.aclose()

    async def submit(
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
        """Queue one chat; returns its request id (the existing one for a known
        ``idempotency_key``). ``deadline_s`` is relative to now: a request still queued then
        is dropped with ``deadline_exceeded``. Raises :class:`ProtocolError` naming the bad
        field (before touching Redis) or :class:`QueueFull` with ``retry_after_s``."""
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
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._queued.append((env, payload, future))
        if self._sender is None:
            self._sender = asyncio.create_task(self._send_queued())
        return await future

    async def submit_many(self, requests: Sequence[BatchRequest], **defaults: Any) -> list[str]:
        """Queue many chats in one atomic Lua call; their request ids, in order.

        Each request is its messages or a mapping with ``messages`` and any :meth:`submit`
        option; ``defaults`` (``model=...``, ``max_tokens=...``) apply to all. All or
        nothing: any invalid request raises :class:`ProtocolError` naming
        ``requests[i].<field>`` before Redis is touched, and if a model's backlog bound would
        be passed nothing is queued and :class:`QueueFull` says when the whole batch fits.
        Known idempotency keys give their existing ids (a key repeated within the batch
        maps to one request). At most :data:`producer.batch.MAX_BATCH_REQUESTS` requests."""
        return await self._send(
            enqueue_call(self.keys, self.settings, build_batch(self.settings, requests, defaults))
        )

    async def result(
        self, request_id: str, timeout_s: float = DEFAULT_RESULT_TIMEOUT_S
    ) -> ChatResult:
        """Wait for the final result; :class:`RequestFailed` for an ``error`` final,
        :class:`ResultTimeout` when none arrives within ``timeout_s``."""
        cursor = ResultCursor(check_request_id(request_id))
        deadline = time.monotonic() + timeout_s
        while cursor.final is None:
            if await self._read(cursor, deadline) is None:
                raise ResultTimeout(f"no result for {request_id} within {timeout_s} s")
        return cursor.outcome()

    async def stream(
        self,
        request_id: str,
        *,
        from_index: int = 0,
        timeout_s: float = DEFAULT_STREAM_IDLE_TIMEOUT_S,
    ) -> AsyncIterator[str]:
        """Yield text deltas from chunk ``from_index`` on (resume after a disconnect by
        passing the number of deltas already received); ends at the final result.
        ``timeout_s`` bounds the wait for each next entry."""
        cursor = ResultCursor(check_request_id(request_id), from_index)
        while cursor.final is None:
            deltas = await self._read(cursor, time.monotonic() + timeout_s)
            if deltas is None:
                raise ResultTimeout(f"no result entry for {request_id} within {timeout_s} s")
            for delta in deltas:
                yield delta
        cursor.outcome()

    async def cancel(self, request_id: str) -> bool:
        """Cancel a queued or running request; False if it already had a final result."""
        check_request_id(request_id)
        with redis_errors():
            pipe = self.redis.pipeline(transaction=True)
            queue_cancel(pipe, self.keys, request_id)
            finished, _, _ = await pipe.execute()
        return not finished

    async def chat(
        self,
        messages: Sequence[Mapping[str, str] | Message],
        *,
        timeout_s: float = DEFAULT_RESULT_TIMEOUT_S,
        **kw: Any,
    ) -> ChatResult:
        """``submit`` then ``result``."""
        request_id = await self.submit(messages, **kw)
        return await self.result(request_id, timeout_s=timeout_s)

    @overload
    async def results_many(
        self,
        request_ids: Sequence[str],
        timeout_s: float = ...,
        *,
        return_exceptions: Literal[False] = ...,
    ) -> list[ChatResult]: ...

    @overload
    async def results_many(
        self, request_ids: Sequence[str], timeout_s: float = ..., *, return_exceptions: bool
    ) -> list[ChatResult | ChatqError]: ...

    async def results_many(
        self,
        request_ids: Sequence[str],
        timeout_s: float = DEFAULT_RESULT_TIMEOUT_S,
        *,
        return_exceptions: bool = False,
    ) -> list[ChatResult] | list[ChatResult | ChatqError]:
        """Wait for many final results with one blocking XREAD over many result streams.

        Results come in the order of ``request_ids``. By default the first request (in that
        order) that failed or had no result within ``timeout_s`` raises its
        :class:`RequestFailed` / :class:`ResultTimeout`; with ``return_exceptions=True`` those
        errors take the request's place in the list instead (as ``asyncio.gather`` does)."""
        window = ResultsWindow(self.keys, request_ids)
        deadline = time.monotonic() + timeout_s
        while not window.done:
            wait_ms = block_ms(deadline, self.settings.socket_timeout_s)
            with redis_errors():
                reply = await self.redis.xread(window.streams(), count=READ_COUNT, block=wait_ms)
            if reply:
                window.feed(reply)
            elif time.monotonic() >= deadline:
                break
        outcomes = window.outcomes(timeout_s)
        return outcomes if return_exceptions else raise_first(outcomes)

    @overload
    async def chat_many(
        self,
        requests: Sequence[BatchRequest],
        *,
        timeout_s: float = ...,
        return_exceptions: Literal[False] = ...,
        **defaults: Any,
    ) -> list[ChatResult]: ...

    @overload
    async def chat_many(
        self,
        requests: Sequence[BatchRequest],
        *,
        timeout_s: float = ...,
        return_exceptions: bool,
        **defaults: Any,
    ) -> list[ChatResult | ChatqError]: ...

    async def chat_many(
        self,
        requests: Sequence[BatchRequest],
        *,
        timeout_s: float = DEFAULT_RESULT_TIMEOUT_S,
        return_exceptions: bool = False,
        **defaults: Any,
    ) -> list[ChatResult] | list[ChatResult | ChatqError]:
        """``submit_many`` then ``results_many``."""
        request_ids = await self.submit_many(requests, **defaults)
        return await self.results_many(request_ids, timeout_s, return_exceptions=return_exceptions)

    async def _send_queued(self) -> None:
        """Send the waiting submits, up to MAX_BATCH_REQUESTS a call, until none is left."""
        batch: list[tuple[Envelope, bytes, asyncio.Future[str]]] = []
        try:
            while self._queued:
                batch = self._queued[:MAX_BATCH_REQUESTS]
                del self._queued[: len(batch)]
                call = enqueue_call(
                    self.keys, self.settings, [(env, data) for env, data, _ in batch], each=True
                )
                try:
                    with redis_errors():
                        reply = await self._enqueue(keys=call.keys, args=call.args)
                    outcomes = each_outcome(reply, call, self.settings)
                except ChatqError as err:
                    for _, _, future in batch:
                        if not future.done():  # a fresh error per caller, same cause
                            future.set_exception(copy_error(err))
                    continue
                for (_, _, future), outcome in zip(batch, outcomes, strict=True):
                    if future.done():  # the caller was cancelled; its request may be queued
                        continue
                    if isinstance(outcome, QueueFull):
                        future.set_exception(outcome)
                    else:
                        future.set_result(outcome)
                batch = []
        except BaseException as err:  # cancelled (aclose) or a bug: no caller waits forever
            for _, _, future in batch + self._queued:
                if not future.done():
                    future.set_exception(ChatqError(f"submit failed: {err!r}"))
            self._queued.clear()
            raise
        finally:
            self._sender = None

    async def _send(self, call: EnqueueCall) -> list[str]:
        with redis_errors():
            reply = await self._enqueue(keys=call.keys, args=call.args)
        return enqueue_outcome(reply, call, self.settings)

    async def _read(self, cursor: ResultCursor, deadline: float) -> list[str] | None:
        """One blocking XREAD; the deltas it brought, or None if the deadline passed."""
        key = self.keys.result(cursor.request_id)
        while True:
            wait_ms = block_ms(deadline, self.settings.socket_timeout_s)
            with redis_errors():
                reply = await self.redis.xread(
                    {key: cursor.last_id}, count=READ_COUNT, block=wait_ms
                )
            entries = stream_entries(reply)
            if entries:
                return cursor.feed(entries)
            if time.monotonic() >= deadline:
                return None
