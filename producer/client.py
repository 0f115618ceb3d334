"""The asyncio client backend services use: submit chats, wait for or stream results, cancel.

A thin layer over ``redis.asyncio``: the request is validated and encoded before Redis is
touched, enqueued with one atomic Lua call (ENQUEUE, ``docs/protocol.md``: idempotency,
backlog cost and bound, XADD; ``submit_many`` queues many requests in one such call), and
results are read by blocking XREAD on the request's result stream (``results_many``: one
XREAD over many streams), never a polling loop. Concurrent ``submit`` calls share ENQUEUE
calls: those made while one is in flight go together in the next, each admitted as if
enqueued alone.
:class:`producer.sync_client.SyncChatClient` has the same methods (its submits go one by one).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from types import TracebackType
from typing import Any, Literal, overload

import redis.asyncio as aioredis

from producer.batch import (
    MAX_BATCH_REQUESTS,
    BatchRequest,
    ResultsWindow,
    build_batch,
    copy_error,
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
from producer.connection import connect, xread_any
from producer.contract.cancel import CancelOutcome, cancel_call, cancel_outcome, check_token
from producer.contract.enqueue import (
    EnqueueCall,
    by_partition,
    each_outcome,
    enqueue_call,
    enqueue_outcome,
    request_partition,
)
from producer.contract.envelope import Envelope, RequestId
from producer.contract.keys import Keys
from producer.contract.options import SubmitOptions
from producer.contract.results import Chunk
from producer.contract.scripts import CANCEL, ENQUEUE
from producer.errors import ChatqError, ResultTimeout
from producer.retry import RetryPolicy, retrying
from producer.settings import ClientSettings


class ChatClient:
    """``async with ChatClient("redis://...") as client: text = (await client.chat(...)).text``"""

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
        self.redis: aioredis.Redis = connect(
            self.settings.redis_url, socket_timeout=self.settings.socket_timeout_s
        )
        self._enqueue = self.redis.register_script(ENQUEUE)
        self._cancel = self.redis.register_script(CANCEL)
        # submit() calls made while an ENQUEUE call is in flight wait here and go together
        # in the next call, each admitted on its own (auto-pipelining, as ioredis does).
        self._queued: list[tuple[Envelope, bytes, asyncio.Future[RequestId]]] = []
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
        messages: Messages,
        options: SubmitOptions | None = None,
        *,
        request_id: str | None = None,
        **kwargs: Any,
    ) -> RequestId:
        """Queue one chat; returns its request id (a ``str`` carrying the request's
        ``cancel_token``; for a known ``idempotency_key`` with the same messages and params,
        the existing request's id, without a token). ``request_id``: the id to give it
        (default a new random one; the HTTP gateway picks its own to count the request
        against its tenant's limits before queueing it). Options come as a
        :class:`SubmitOptions` and/or keywords:
        ``model``, the sampling fields (``max_tokens``, ``temperature``, ``top_p``,
        ``top_k``, ``seed``, ``stop``, ``ignore_eos``) or ``params``, ``priority``,
        ``deadline_s`` (seconds from now: a request still queued then is dropped with
        ``deadline_exceeded``), ``idempotency_key``, ``stream``, ``tenant``,
        ``callback_url``. Raises :class:`ProtocolError` naming the bad field (before
        touching Redis, or ``request_id`` / ``idempotency_key`` refused by Redis: an id is
        never reused, a key never names two bodies), :class:`QueueFull` with
        ``retry_after_s`` (see :meth:`submit_retrying`), or :class:`ModelNotServed` when no
        live worker serves the model (unless the client allows that: ``allow_unserved``)."""
        env, payload = build_envelope(self.settings, messages, options, kwargs, request_id)
        request_partition(self.keys, env)  # an id in its idempotency scope's partition
        future: asyncio.Future[RequestId] = asyncio.get_running_loop().create_future()
        self._queued.append((env, payload, future))
        if self._sender is None:
            self._sender = asyncio.create_task(self._send_queued())
        return await future

    async def submit_retrying(
        self,
        messages: Messages,
        options: SubmitOptions | None = None,
        *,
        policy: RetryPolicy | None = None,
        **kwargs: Any,
    ) -> RequestId:
        """:meth:`submit`, retried after each :class:`QueueFull` as its ``retry_after_s``
        says (a hint ENQUEUE spreads over the waiting callers, with jitter) until
        ``policy.max_wait_s`` would be passed; then the last :class:`QueueFull` is raised.
        The request keeps one id across tries."""
        request_id = kwargs.pop("request_id", None) or new_id_for(
            self.settings, messages, options, kwargs
        )
        return await retrying(
            lambda: self.submit(messages, options, request_id=request_id, **kwargs),
            policy or RetryPolicy(),
            asyncio.sleep,
        )

    async def submit_many(
        self,
        requests: Sequence[BatchRequest],
        options: SubmitOptions | None = None,
        **defaults: Any,
    ) -> list[RequestId]:
        """Queue many chats in one atomic Lua call; their request ids, in order.

        Each request is its messages or a mapping with ``messages`` and any :meth:`submit`
        option; ``options`` and ``defaults`` (``model=...``, ``max_tokens=...``) apply to
        all. All or
        nothing: any invalid request raises :class:`ProtocolError` naming
        ``requests[i].<field>`` before Redis is touched, and if a model's backlog bound would
        be passed nothing is queued and :class:`QueueFull` says when the whole batch fits.
        Known idempotency keys give their existing ids (a key repeated within the batch
        maps to one request). At most :data:`producer.batch.MAX_BATCH_REQUESTS` requests."""
        encoded = build_batch(self.settings, requests, options, defaults)
        ids: list[RequestId] = []
        slots: list[int] = []
        # One call per partition: all or nothing within each (one, unless the batch's
        # idempotency keys or chosen ids span several; docs/reliability.md).
        for partition, indexes in by_partition(self.keys, [env for env, _ in encoded]).items():
            call = enqueue_call(
                self.keys,
                self.settings.max_backlog_tokens,
                [encoded[i] for i in indexes],
                allow_unserved=self.settings.allow_unserved,
                partition=partition,
            )
            ids += await self._send(call)
            slots += indexes
        out: list[RequestId] = list(ids)
        for slot, request_id in zip(slots, ids, strict=True):
            out[slot] = request_id
        return out

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
        ``timeout_s`` bounds the wait for each next entry. A request for ``n`` > 1 answers
        yields its first answer's text (:meth:`stream_chunks` has them all)."""
        async for item in self.stream_with_result(
            request_id, from_index=from_index, timeout_s=timeout_s
        ):
            if isinstance(item, str):
                yield item

    async def stream_with_result(
        self,
        request_id: str,
        *,
        from_index: int = 0,
        timeout_s: float = DEFAULT_STREAM_IDLE_TIMEOUT_S,
    ) -> AsyncIterator[str | ChatResult]:
        """:meth:`stream`'s text deltas, then the :class:`ChatResult` as the last item
        (usage, finish reason: what an HTTP gateway's last chunk carries), read in the same
        pass over the result stream. Raises as :meth:`stream` does."""
        cursor = ResultCursor(check_request_id(request_id), from_index)
        while cursor.final is None:
            deltas = await self._read(cursor, time.monotonic() + timeout_s)
            if deltas is None:
                raise ResultTimeout(f"no result entry for {request_id} within {timeout_s} s")
            for delta in deltas:
                yield delta
        yield cursor.outcome()

    async def stream_chunks(
        self,
        request_id: str,
        *,
        from_index: int = 0,
        timeout_s: float = DEFAULT_STREAM_IDLE_TIMEOUT_S,
    ) -> AsyncIterator[Chunk | ChatResult]:
        """Whole chunks (text, reasoning and tool-call deltas, and the tokens' ``logprobs``
        when the request asked for them) from chunk ``from_index`` on, then the
        :class:`ChatResult` as the last item; raises as :meth:`stream` does."""
        cursor = ResultCursor(check_request_id(request_id), from_index)
        while cursor.final is None:
            if await self._read(cursor, time.monotonic() + timeout_s) is None:
                raise ResultTimeout(f"no result entry for {request_id} within {timeout_s} s")
            for chunk in cursor.new_chunks:
                yield chunk
        yield cursor.outcome()

    async def cancel(self, request_id: str, cancel_token: str | None = None) -> CancelOutcome:
        """Cancel a queued or running request: ``CancelOutcome.CANCELLED`` (true), or
        ``FINISHED`` when it already had a final result, ``UNKNOWN`` when no request has
        this id (both false; nothing is written). Needs the request's cancel token: the id
        :meth:`submit` returned carries it, or pass ``cancel_token``; a wrong or missing
        one raises :class:`ProtocolError` (``not_owner``, field ``cancel_token``)."""
        token = check_token(request_id, cancel_token)
        check_request_id(request_id)
        keys, args = cancel_call(self.keys, str(request_id), token)
        with redis_errors():
            reply = await self._cancel(keys=keys, args=args)
        return cancel_outcome(reply, request_id)

    async def chat(
        self,
        messages: Messages,
        options: SubmitOptions | None = None,
        *,
        timeout_s: float = DEFAULT_RESULT_TIMEOUT_S,
        **kwargs: Any,
    ) -> ChatResult:
        """``submit`` then ``result``."""
        request_id = await self.submit(messages, options, **kwargs)
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
                reply = await xread_any(
                    self.redis, window.streams(), count=READ_COUNT, block=wait_ms
                )
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
        options: SubmitOptions | None = ...,
        *,
        timeout_s: float = ...,
        return_exceptions: Literal[False] = ...,
        **defaults: Any,
    ) -> list[ChatResult]: ...

    @overload
    async def chat_many(
        self,
        requests: Sequence[BatchRequest],
        options: SubmitOptions | None = ...,
        *,
        timeout_s: float = ...,
        return_exceptions: bool,
        **defaults: Any,
    ) -> list[ChatResult | ChatqError]: ...

    async def chat_many(
        self,
        requests: Sequence[BatchRequest],
        options: SubmitOptions | None = None,
        *,
        timeout_s: float = DEFAULT_RESULT_TIMEOUT_S,
        return_exceptions: bool = False,
        **defaults: Any,
    ) -> list[ChatResult] | list[ChatResult | ChatqError]:
        """``submit_many`` then ``results_many``."""
        request_ids = await self.submit_many(requests, options, **defaults)
        return await self.results_many(request_ids, timeout_s, return_exceptions=return_exceptions)

    async def _send_queued(self) -> None:
        """Send the waiting submits, up to MAX_BATCH_REQUESTS a call, until none is left."""
        batch: list[tuple[Envelope, bytes, asyncio.Future[RequestId]]] = []
        try:
            while self._queued:
                batch = self._queued[:MAX_BATCH_REQUESTS]
                del self._queued[: len(batch)]
                parts: dict[int, list[tuple[Envelope, bytes, asyncio.Future[RequestId]]]] = {}
                for queued in batch:
                    parts.setdefault(self.keys.partition_of(queued[0].id), []).append(queued)
                for partition, part in parts.items():
                    await self._send_each(partition, part)
                batch = []
        except BaseException as err:  # cancelled (aclose) or a bug: no caller waits forever
            for _, _, future in batch + self._queued:
                if not future.done():
                    future.set_exception(ChatqError(f"submit failed: {err!r}"))
            self._queued.clear()
            raise
        finally:
            self._sender = None

    async def _send_each(
        self, partition: int, batch: list[tuple[Envelope, bytes, asyncio.Future[RequestId]]]
    ) -> None:
        """One ENQUEUE call in ``each`` mode for requests of one partition; every caller's
        future gets its outcome."""
        call = enqueue_call(
            self.keys,
            self.settings.max_backlog_tokens,
            [(env, data) for env, data, _ in batch],
            each=True,
            allow_unserved=self.settings.allow_unserved,
            partition=partition,
        )
        try:
            with redis_errors():
                reply = await self._enqueue(keys=call.keys, args=call.args)
            outcomes = each_outcome(reply, call)
        except ChatqError as err:
            for _, _, future in batch:
                if not future.done():  # a fresh error per caller, same cause
                    future.set_exception(copy_error(err))
            return
        for (_, _, future), outcome in zip(batch, outcomes, strict=True):
            if future.done():  # the caller was cancelled; its request may be queued
                continue
            if isinstance(outcome, ChatqError):  # QueueFull, ModelNotServed
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

    async def _send(self, call: EnqueueCall) -> list[RequestId]:
        with redis_errors():
            reply = await self._enqueue(keys=call.keys, args=call.args)
        return enqueue_outcome(reply, call)

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
