"""The gateway's work behind the routes: who is calling, queue a chat, wait, cancel.

One :class:`Gateway` per process holds the shared resources (one :class:`ChatClient`, whose
Redis pool everything here shares). It is a producer like any other: requests go through
the client's submit / result / stream / cancel, nothing else writes the queue.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from typing import Any

from gateway.callbacks import check_callback_url
from gateway.chat_body import ChatRequest
from gateway.errors import Code, GatewayError, from_chatq
from gateway.jobs import JobStore
from gateway.limits import Caller, TenantLimiter
from gateway.served import ServedModels
from gateway.settings import GatewaySettings
from gateway.tenants import ANONYMOUS_TENANT, TenantStore, key_digest
from producer.calls import ChatResult
from producer.client import ChatClient
from producer.contract.cancel import CancelOutcome
from producer.contract.enqueue import cost_tokens
from producer.contract.keys import Keys
from producer.contract.results import Chunk
from producer.errors import ChatqError
from producer.settings import ClientSettings

log = logging.getLogger("chatq.gateway")

_CALLER_CACHE_MAX = 10_000
_LEASE_MARGIN_S = 30.0


@dataclass(frozen=True)
class Queued:
    """A request the gateway queued: its id, and whether it is a replay of an earlier one
    (same ``Idempotency-Key``)."""

    request_id: str
    replay: bool
    tracked: bool  # counted in its tenant's in-flight set: release when answered
    cancel_token: str = ""  # the request's cancel token ("" for a replay: the first holds it)


class Gateway:
    """Shared state of one gateway process (``async with`` or ``start`` / ``aclose``)."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.keys = Keys(settings.prefix)
        self.client = ChatClient(
            settings=ClientSettings(redis_url=settings.redis_url, prefix=settings.prefix)
        )
        self.redis = self.client.redis
        self.tenants = TenantStore(self.redis, self.keys)
        self.limiter = TenantLimiter(self.redis, self.keys)
        self.models = ServedModels(self.redis, self.keys, settings.models_refresh_s)
        self.jobs = JobStore(self.redis, self.keys, settings.job_result_ttl_s)
        self.callback_policy = settings.callback_policy
        self._callers: dict[str, str] = {}  # key digest → tenant (the ADMIT call re-checks)
        self._background: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Check Redis and the keys, then start reading the live workers' models."""
        try:
            has_keys = await self.tenants.has_keys()
            if self.settings.allow_anonymous:
                await self.tenants.ensure_tenant(ANONYMOUS_TENANT)
            await self.models.refresh()
        except Exception as err:
            raise GatewayError(
                Code.REDIS_UNAVAILABLE, f"Redis at {self.settings.redis_url}: {err}"
            ) from err
        if not has_keys and not self.settings.allow_anonymous:
            raise GatewayError(
                Code.INVALID_API_KEY,
                "no API keys exist: create one with `chatq keys create --tenant NAME`, or "
                "start with --allow-anonymous (demo, local use)",
            )
        self.models.start()

    async def aclose(self) -> None:
        await self.models.aclose()
        for task in list(self._background):
            await task
        await self.client.aclose()

    # --- who is calling ---

    async def caller(self, authorization: str | None) -> Caller:
        """The tenant behind an ``Authorization: Bearer`` header (401 if none is valid)."""
        if not authorization:
            if self.settings.allow_anonymous:
                return Caller(ANONYMOUS_TENANT, None)
            raise GatewayError(Code.INVALID_API_KEY, "missing API key (Authorization: Bearer)")
        scheme, _, token = authorization.partition(" ")
        digest = key_digest(token.strip()) if scheme.lower() == "bearer" else None
        if digest is None:
            raise GatewayError(Code.INVALID_API_KEY, "invalid API key")
        tenant = self._callers.get(digest)
        if tenant is None:
            tenant = await self.tenants.tenant_of(token.strip())
            if tenant is None:
                raise GatewayError(Code.INVALID_API_KEY, "invalid API key")
            if len(self._callers) >= _CALLER_CACHE_MAX:
                self._callers.clear()
            self._callers[digest] = tenant
        return Caller(tenant, digest)

    # --- queueing ---

    async def queue(
        self,
        caller: Caller,
        chat: ChatRequest,
        *,
        stream: bool,
        idempotency_key: str | None,
        lease_s: float,
        result_ttl_s: int | None = None,
    ) -> Queued:
        """Check the model is served, count the request against its tenant's limits, queue
        it (its result kept ``result_ttl_s``, default the worker's). A request that fails
        to queue gives its tenant's counts back."""
        await self.models.require(chat.model)
        options = dict(chat.options)
        if result_ttl_s is not None:
            options["result_ttl_s"] = result_ttl_s
        if "callback_url" in options:
            await check_callback_url(options["callback_url"], self.callback_policy)
        request_id = uuid.uuid4().hex
        cost = _cost_tokens(chat, options)
        tracked = await self.limiter.admit(caller, request_id, cost, lease_s + _LEASE_MARGIN_S)
        try:
            queued_id = await self.client.submit(
                chat.messages,
                request_id=request_id,
                tenant=caller.tenant,
                stream=stream,
                idempotency_key=_scoped(caller.tenant, idempotency_key),
                **options,
            )
        except ChatqError as err:
            await self.limiter.refund(caller.tenant, request_id, cost)
            raise from_chatq(err, param_names=chat.param_names) from err
        replay = queued_id != request_id
        if replay:  # an idempotent replay: the first request is the one counted
            await self.limiter.refund(caller.tenant, request_id, cost)
        if chat.user is not None and self.settings.access_log:
            log.info("request %s tenant %s user %r", queued_id, caller.tenant, chat.user)
        return Queued(str(queued_id), replay, tracked and not replay, queued_id.cancel_token)

    async def result(self, request_id: str) -> ChatResult:
        try:
            return await self.client.result(request_id, timeout_s=self.settings.request_timeout_s)
        except ChatqError as err:
            raise from_chatq(err) from err

    async def stream_chunks(
        self, request_id: str, from_index: int = 0
    ) -> AsyncIterator[Chunk | ChatResult]:
        """Whole chunks (text, reasoning, tool calls) from chunk ``from_index`` on, then the
        :class:`ChatResult`."""
        try:
            async for item in self.client.stream_chunks(
                request_id, from_index=from_index, timeout_s=self.settings.stream_idle_timeout_s
            ):
                yield item
        except ChatqError as err:
            raise from_chatq(err) from err

    def finished(self, caller: Caller, queued: Queued) -> None:
        """The caller got its answer: the request stops counting as in flight."""
        if queued.tracked:
            self._spawn(self.limiter.release(caller.tenant, queued.request_id))

    def abandon(self, caller: Caller, queued: Queued) -> None:
        """The caller went away: cancel the request (the engine stops working on it) and
        stop counting it; in the background, since the caller's task is being torn down."""
        self._spawn(self._cancel(caller, queued))

    async def cancel(self, request_id: str, cancel_token: str) -> CancelOutcome:
        """Cancel a request the caller owns (the job API checks the owner first)."""
        try:
            return await self.client.cancel(request_id, cancel_token)
        except ChatqError as err:
            raise from_chatq(err) from err

    async def _cancel(self, caller: Caller, queued: Queued) -> None:
        if queued.cancel_token:  # a replay's caller going away leaves the first one running
            await self.client.cancel(queued.request_id, queued.cancel_token)
            log.info("request %s cancelled: its caller disconnected", queued.request_id)
        await self.limiter.release(caller.tenant, queued.request_id)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("background Redis call failed: %r", task.exception())


def _scoped(tenant: str, key: str | None) -> str | None:
    """Idempotency keys are per tenant: one tenant's key never returns another's request."""
    return None if key is None else f"{tenant}:{key}"


def _cost_tokens(chat: ChatRequest, options: dict[str, object]) -> int:
    """The request's queue cost (what ENQUEUE and the tenant's tpm count), by the producer's
    own formula."""
    max_tokens, n = options.get("max_tokens"), options.get("n", 1)
    contents = [m["content"] for m in chat.messages]
    return cost_tokens(
        contents, max_tokens if isinstance(max_tokens, int) else 0, n if isinstance(n, int) else 1
    )


async def check_startup(settings: GatewaySettings) -> None:
    """What the gateway checks before it serves (Redis reachable, keys exist unless
    anonymous use is allowed): run once by ``chatq gateway`` before starting processes."""
    gateway = Gateway(settings)
    try:
        await gateway.start()
    finally:
        await gateway.aclose()
