"""``chatq webhooks``: the arq worker that delivers callbacks, signed, retried, recorded.

Workers queue one arq job per request with a ``callback_url`` when its final result is
written (:mod:`producer.contract.webhook_job`). Each delivery re-checks the URL
(:mod:`gateway.callbacks`), POSTs the job's JSON (the same object ``GET /v1/jobs/{id}``
gives) signed as Standard Webhooks do with the tenant's secret (:mod:`gateway.signing`), and
on anything but a 2xx answer retries with exponential backoff and jitter until
``webhook_max_age_s`` after the final result; then the failure is recorded where
``chatq status`` shows it. A refused URL is recorded at once (retrying cannot help).
Delivery is at least once: a receiver deduplicates by ``webhook-id`` (the request id), which
every attempt of one request carries.
"""

from __future__ import annotations

import logging
import random
import time
from datetime import datetime
from typing import Any

import httpx
import orjson
from arq import Retry
from arq.connections import RedisSettings
from arq.worker import Worker, func
from redis.asyncio import Redis

from gateway import signing
from gateway.callbacks import CallbackTarget, check_callback_url
from gateway.errors import ConfigError, GatewayError
from gateway.jobs import JobRecord, JobState
from gateway.settings import WebhookSettings
from gateway.tenants import DEFAULT_TENANT, TenantStore
from producer.calls import ChatResult
from producer.connection import SENTINEL_SCHEME, SentinelUrl
from producer.contract.keys import WEBHOOK_FAILED_MAXLEN, Keys
from producer.contract.results import RESULT_BODY_FIELD, RESULT_TYPE_FIELD, Done, decode_result
from producer.contract.webhook_job import DELIVER_FUNCTION, deserialize, serialize

log = logging.getLogger("chatq.webhooks")


class Delivery:
    """Delivers one job's callback per call (shared by the worker's concurrent jobs)."""

    def __init__(self, settings: WebhookSettings, redis: Redis) -> None:
        self.settings = settings
        self.redis = redis
        self.keys = Keys(settings.prefix)
        self.tenants = TenantStore(redis, self.keys)
        self.policy = settings.callback_policy
        self.http = httpx.AsyncClient(timeout=settings.webhook_timeout_s, follow_redirects=False)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def deliver(self, ctx: dict[str, Any], request_id: str, **job: Any) -> dict[str, Any]:
        """One attempt: 2xx → done; else ``Retry`` after the backoff, or the failure
        recorded once the retry window has passed."""
        attempt = int(ctx.get("job_try", 1))
        enqueued: datetime = ctx["enqueue_time"]
        first_ms = int(enqueued.timestamp() * 1000)
        url, tenant = str(job["callback_url"]), job.get("tenant")
        try:
            target = await check_callback_url(url, self.policy)
        except GatewayError as err:
            await self._record_failure(request_id, tenant, url, err.message, attempt, first_ms)
            return {"delivered": False, "reason": err.message}
        body = orjson.dumps(_event(request_id, first_ms, job))
        secret = await self.tenants.webhook_secret(tenant or DEFAULT_TENANT)
        reason = await self._post(
            target, signing.headers(secret, request_id, int(time.time()), body), body
        )
        if reason is None:
            await self.redis.hincrby(self.keys.webhook_stats, "delivered", 1)  # type: ignore[misc]
            log.info("delivered %s to %s (attempt %d)", request_id, url, attempt)
            return {"delivered": True, "attempts": attempt}
        delay_s = self.backoff_s(attempt)
        if time.time() + delay_s - first_ms / 1000 > self.settings.webhook_max_age_s:
            await self._record_failure(request_id, tenant, url, reason, attempt, first_ms)
            return {"delivered": False, "reason": reason}
        await self.redis.hincrby(self.keys.webhook_stats, "retried", 1)  # type: ignore[misc]
        log.info(
            "delivery of %s failed (%s); retry %d in %.1f s", request_id, reason, attempt, delay_s
        )
        raise Retry(defer=delay_s)

    def backoff_s(self, attempt: int) -> float:
        """Exponential (doubling from ``webhook_backoff_s``, capped), half of it jittered,
        so receivers coming back are not hit by every pending delivery at once."""
        s = self.settings
        delay = min(s.webhook_max_backoff_s, s.webhook_backoff_s * 2 ** min(attempt - 1, 40))
        return float(delay / 2 + random.uniform(0, delay / 2))

    async def _post(
        self, target: CallbackTarget, headers: dict[str, str], body: bytes
    ) -> str | None:
        """POST to the checked addresses (first that connects); None on a 2xx answer, else
        why not."""
        reason = "no address"
        for address in target.addresses:
            url, extensions = _pinned(target, address)
            try:
                response = await self.http.post(
                    url,
                    content=body,
                    headers={**headers, "host": target.parts.netloc},
                    extensions=extensions,
                )
            except httpx.ConnectError as err:
                reason = f"connect to {address}: {err!r}"
                continue
            except httpx.HTTPError as err:
                return f"{type(err).__name__}: {err}"
            if 200 <= response.status_code < 300:
                return None
            return f"HTTP {response.status_code}"
        return reason

    async def _record_failure(
        self,
        request_id: str,
        tenant: str | None,
        url: str,
        reason: str,
        attempts: int,
        first_ms: int,
    ) -> None:
        log.warning("giving up on delivering %s to %s: %s", request_id, url, reason)
        pipe = self.redis.pipeline(transaction=True)
        pipe.xadd(
            self.keys.webhook_failed,
            {
                "id": request_id,
                "tenant": tenant or "",
                "url": url,
                "reason": reason,
                "attempts": attempts,
                "first_ms": first_ms,
                "last_ms": time.time_ns() // 10**6,
            },
            maxlen=WEBHOOK_FAILED_MAXLEN,
            approximate=True,
        )
        pipe.hincrby(self.keys.webhook_stats, "failed", 1)
        await pipe.execute()


def _pinned(target: CallbackTarget, address: str) -> tuple[str, dict[str, Any]]:
    """The URL with its host replaced by ``address`` (the one checked), and the TLS server
    name to verify the certificate against."""
    host = f"[{address}]" if ":" in address else address
    netloc = f"{host}:{target.port}"
    url = target.parts._replace(netloc=netloc).geturl()
    extensions: dict[str, Any] = {}
    if target.parts.scheme == "https":
        extensions["sni_hostname"] = target.host
    return url, extensions


def _event(request_id: str, first_ms: int, job: dict[str, Any]) -> dict[str, Any]:
    """The delivered JSON: ``{type, timestamp, data}`` with the job object as ``data``."""
    entry = decode_result({RESULT_TYPE_FIELD: job["kind"], RESULT_BODY_FIELD: job["body"]})
    created_s = first_ms // 1000
    if isinstance(entry, Done):
        created_s = int((first_ms - entry.timings.total_ms) // 1000)
    record = JobRecord(request_id, job.get("tenant") or "", str(job.get("model", "")), created_s)
    if isinstance(entry, Done):
        state = JobState(record, "done", result=ChatResult.from_done(request_id, entry))
    else:
        status = "cancelled" if entry.code == "cancelled" else "error"  # type: ignore[union-attr]
        state = JobState(record, status, error=entry)  # type: ignore[arg-type]
    return {
        "type": f"chat.completion.job.{state.status}",
        "timestamp": datetime.fromtimestamp(first_ms / 1000).astimezone().isoformat(),
        "data": state.to_json(),
    }


async def deliver_webhook(ctx: dict[str, Any], request_id: str, **job: Any) -> dict[str, Any]:
    delivery: Delivery = ctx["delivery"]
    return await delivery.deliver(ctx, request_id, **job)


def build_worker(settings: WebhookSettings) -> Worker:
    """The arq worker serving the delivery queue of ``settings.prefix``."""
    keys = Keys(settings.prefix)

    async def startup(ctx: dict[str, Any]) -> None:
        ctx["delivery"] = Delivery(settings, ctx["redis"])

    async def shutdown(ctx: dict[str, Any]) -> None:
        if "delivery" in ctx:
            await ctx["delivery"].aclose()

    return Worker(
        functions=[
            func(
                deliver_webhook,
                name=DELIVER_FUNCTION,
                max_tries=1_000_000,
                timeout=settings.webhook_timeout_s * 2 + 5,
            )
        ],
        queue_name=keys.webhook_queue,
        redis_settings=arq_redis_settings(settings.redis_url),
        burst=settings.burst,
        max_jobs=settings.webhook_concurrency,
        job_serializer=serialize,
        job_deserializer=deserialize,
        on_startup=startup,
        on_shutdown=shutdown,
        poll_delay=0.2,
        keep_result=3600,
        # refreshed every 5 s with a TTL of 6 s: the key exists only while the worker runs
        # (the compose health check reads it; arq's default is once an hour)
        health_check_key=f"{keys.webhook_queue}:health-check",
        health_check_interval=5,
    )


def arq_redis_settings(url: str) -> RedisSettings:
    """arq's settings for ``url``: its own DSN parsing for a plain URL, its Sentinel mode
    (the same Sentinels, service and credentials) for a ``redis+sentinel://`` URL."""
    if not url.startswith(SENTINEL_SCHEME + "://"):
        return RedisSettings.from_dsn(url)
    target = SentinelUrl.parse(url)
    if target.sentinel_username or target.sentinel_password:
        raise ConfigError(
            "redis_url",
            "arq cannot authenticate to Sentinels (sentinel_username / sentinel_password): "
            "give chatq webhooks a URL without them",
        )
    return RedisSettings(
        host=list(target.sentinels),
        sentinel=True,
        sentinel_master=target.service,
        database=target.db,
        username=target.username,
        password=target.password,
    )
