"""Per-tenant limits (requests/min, tokens/min, requests in flight), enforced in Redis.

One Lua call per request (:data:`ADMIT`) checks the API key is still valid, refills and
debits the tenant's two token buckets, counts its requests in flight and its statistics,
atomically and with Redis's own clock, so the limits hold across any number of gateway
processes and replicas. A bucket holds a minute's worth (``rpm`` requests, ``tpm`` tokens)
and refills continuously; a refused request consumes nothing and learns exactly when it
would fit (``Retry-After``). Tokens are the request's queue cost (prompt estimate + n ×
``max_tokens``, what the backlog bound counts), known before the request runs.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from redis.asyncio import Redis

from gateway.errors import Code, GatewayError
from producer.contract.keys import LIMIT_BUCKETS_TTL_S, Keys

# ADMIT_MANY: admit the requests one gateway process has waiting, together in one call (as
# the client's submits go), each as if alone, in order.
# KEYS: 5 per request: tenant record, buckets, in-flight set, stats, API key record
# ARGV: 6 per request: tenant, cost tokens, request id, lease ms, check key (1/0), buckets
# TTL s. Returns per request {status, wait ms, tracked}: status 0 admitted, 1 bad key,
# 2 rpm, 3 tpm, 4 concurrency, 5 the request alone costs more than the tenant's tpm (it can
# never fit); tracked 1 when the request was added to the in-flight set (to be released).
ADMIT_MANY = """
local function refuse(stats, status, wait_ms, counter)
  redis.call('HINCRBY', stats, counter, 1)
  return {status, math.ceil(wait_ms), 0}
end

local function admit(K, A, now)
  if A[5] == '1' and redis.call('HGET', K[5], 'tenant') ~= A[1] then
    return {1, 0, 0}
  end
  local lim = redis.call('HMGET', K[1], 'rpm', 'tpm', 'max_concurrent')
  local rpm = tonumber(lim[1]) or 0
  local tpm = tonumber(lim[2]) or 0
  local maxc = tonumber(lim[3]) or 0
  local cost = tonumber(A[2])
  if tpm > 0 and cost > tpm then
    return refuse(K[4], 5, 0, 'refused_too_large')
  end
  if maxc > 0 then
    redis.call('ZREMRANGEBYSCORE', K[3], '-inf', now)
    if redis.call('ZCARD', K[3]) >= maxc then
      return refuse(K[4], 4, 1000, 'refused_concurrency')
    end
  end
  local r, t
  if rpm > 0 or tpm > 0 then
    local b = redis.call('HMGET', K[2], 'r', 't', 'ts')
    local elapsed = math.max(now - (tonumber(b[3]) or now), 0)
    if rpm > 0 then
      r = math.min(rpm, (tonumber(b[1]) or rpm) + elapsed * rpm / 60000)
      if r < 1 then
        return refuse(K[4], 2, (1 - r) * 60000 / rpm, 'refused_rpm')
      end
    end
    if tpm > 0 then
      t = math.min(tpm, (tonumber(b[2]) or tpm) + elapsed * tpm / 60000)
      if t < cost then
        return refuse(K[4], 3, (cost - t) * 60000 / tpm, 'refused_tpm')
      end
    end
    redis.call('HSET', K[2], 'ts', now)
    if r then redis.call('HSET', K[2], 'r', r - 1) end
    if t then redis.call('HSET', K[2], 't', t - cost) end
    redis.call('EXPIRE', K[2], A[6])
  end
  if maxc > 0 then
    redis.call('ZADD', K[3], now + tonumber(A[4]), A[3])
    redis.call('PEXPIRE', K[3], A[4])
  end
  redis.call('HINCRBY', K[4], 'requests', 1)
  redis.call('HINCRBY', K[4], 'cost_tokens', cost)
  return {0, 0, maxc > 0 and 1 or 0}
end

local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local out = {}
for i = 0, #KEYS / 5 - 1 do
  out[i + 1] = admit({KEYS[5 * i + 1], KEYS[5 * i + 2], KEYS[5 * i + 3], KEYS[5 * i + 4],
                      KEYS[5 * i + 5]},
                     {ARGV[6 * i + 1], ARGV[6 * i + 2], ARGV[6 * i + 3], ARGV[6 * i + 4],
                      ARGV[6 * i + 5], ARGV[6 * i + 6]}, now)
end
return out
"""

# A request admitted but then not queued (refused by the queue, or an idempotent replay of
# one already counted): give back what ADMIT took.
# KEYS: tenant record, buckets, in-flight set, stats; ARGV: request id, cost tokens
REFUND = """
local lim = redis.call('HMGET', KEYS[1], 'rpm', 'tpm')
local rpm = tonumber(lim[1]) or 0
local tpm = tonumber(lim[2]) or 0
local b = redis.call('HMGET', KEYS[2], 'r', 't')
if rpm > 0 and b[1] then
  redis.call('HSET', KEYS[2], 'r', math.min(rpm, tonumber(b[1]) + 1))
end
if tpm > 0 and b[2] then
  redis.call('HSET', KEYS[2], 't', math.min(tpm, tonumber(b[2]) + tonumber(ARGV[2])))
end
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('HINCRBY', KEYS[4], 'requests', -1)
redis.call('HINCRBY', KEYS[4], 'cost_tokens', -tonumber(ARGV[2]))
return 1
"""

MAX_BATCH = 256  # admissions per ADMIT_MANY call (bounds one script's run time)

_REFUSALS: dict[int, tuple[Code, str]] = {
    1: (Code.INVALID_API_KEY, "invalid API key"),
    2: (Code.RATE_LIMIT_REQUESTS, "requests per minute limit reached for tenant {t}"),
    3: (Code.RATE_LIMIT_TOKENS, "tokens per minute limit reached for tenant {t}"),
    4: (Code.CONCURRENCY_LIMIT, "concurrent requests limit reached for tenant {t}"),
}


@dataclass(frozen=True)
class Caller:
    """Who sent a request: the tenant and, unless anonymous, the digest of the key used."""

    tenant: str
    key_digest: str | None


class TenantLimiter:
    """Admit / release requests against their tenant's limits. Admissions asked for while
    an ADMIT_MANY call is in flight go together in the next one (one call for many
    concurrent requests, each admitted as if alone)."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self._admit_many = redis.register_script(ADMIT_MANY)
        self._refund = redis.register_script(REFUND)
        self._waiting: list[tuple[list[str], list[str | int], asyncio.Future[list[int]]]] = []
        self._sender: asyncio.Task[None] | None = None

    async def admit(
        self, caller: Caller, request_id: str, cost_tokens: int, lease_s: float
    ) -> bool:
        """Count one request against ``caller``'s tenant or raise the 401 / 429 it gets.
        ``lease_s`` bounds how long it counts as in flight if nobody releases it. True if
        it counts as in flight (the tenant has a concurrency limit): release it after."""
        t = caller.tenant
        keys = [
            self.keys.tenant(t),
            self.keys.tenant_buckets(t),
            self.keys.tenant_inflight(t),
            self.keys.tenant_stats(t),
            self.keys.api_key(caller.key_digest or ""),
        ]
        args: list[str | int] = [
            t,
            cost_tokens,
            request_id,
            max(1, int(lease_s * 1000)),
            0 if caller.key_digest is None else 1,
            LIMIT_BUCKETS_TTL_S,
        ]
        future: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        self._waiting.append((keys, args, future))
        if self._sender is None:
            self._sender = asyncio.create_task(self._send_waiting())
        status, wait_ms, tracked = await future
        if status == 0:
            return bool(tracked)
        if status == 5:
            raise GatewayError(
                Code.INVALID_REQUEST,
                f"the request's cost ({cost_tokens} tokens: prompt estimate + n x max_tokens) is "
                f"more than tenant {t}'s tokens-per-minute limit",
                param="max_tokens",
            )
        code, message = _REFUSALS[int(status)]
        retry_s = int(wait_ms) / 1000 if code is not Code.INVALID_API_KEY else None
        raise GatewayError(code, message.format(t=t), retry_after_s=retry_s)

    async def _send_waiting(self) -> None:
        """ADMIT_MANY calls for the waiting admissions (at most MAX_BATCH a call) until none
        is left; a failed call fails the admissions it carried, with the same error."""
        try:
            while self._waiting:
                batch = self._waiting[:MAX_BATCH]
                del self._waiting[: len(batch)]
                keys = [k for entry in batch for k in entry[0]]
                args = [a for entry in batch for a in entry[1]]
                try:
                    replies = await self._admit_many(keys=keys, args=args)
                except Exception as err:  # Redis down: each caller sees the error
                    for _, _, future in batch:
                        if not future.done():
                            future.set_exception(err)
                    continue
                for (_, _, future), reply in zip(batch, replies, strict=True):
                    if not future.done():  # its caller may be gone
                        future.set_result([int(x) for x in reply])
        except BaseException:  # cancelled (shutdown): nobody waits forever
            for _, _, future in self._waiting:
                if not future.done():
                    future.set_exception(
                        GatewayError(Code.REDIS_UNAVAILABLE, "the gateway is shutting down")
                    )
            self._waiting.clear()
            raise
        finally:
            self._sender = None

    async def refund(self, tenant: str, request_id: str, cost_tokens: int) -> None:
        """Give back what :meth:`admit` took for a request that was not queued."""
        keys = [
            self.keys.tenant(tenant),
            self.keys.tenant_buckets(tenant),
            self.keys.tenant_inflight(tenant),
            self.keys.tenant_stats(tenant),
        ]
        await self._refund(keys=keys, args=[request_id, cost_tokens])

    async def release(self, tenant: str, request_id: str) -> None:
        """The request finished: it no longer counts as in flight."""
        await self.redis.zrem(self.keys.tenant_inflight(tenant), request_id)
