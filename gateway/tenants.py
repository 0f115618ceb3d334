"""API keys and tenants in Redis: create, list, revoke, look up; tenant limits and secrets.

A key is ``cq-<key id>-<secret>`` (random, shown once at creation); Redis holds only its
SHA-256 (a key has 256 random bits, so a fast hash is enough: nothing to brute-force).
Limits (rpm, tpm, max concurrent; 0 = none) and the webhook signing secret belong to the
tenant and are shared by all its keys; :mod:`gateway.limits` enforces them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from gateway.errors import Code, GatewayError
from producer.contract.keys import Keys

ANONYMOUS_TENANT = "anonymous"
"""The tenant of requests without a key, where ``--allow-anonymous`` permits them."""
DEFAULT_TENANT = "default"
"""Whose webhook secret signs deliveries of requests queued with no tenant (direct
producers)."""

_TENANT_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_KEY_RE = re.compile(r"cq-([0-9a-f]{12})-[A-Za-z0-9_\-]{43}")


@dataclass(frozen=True)
class TenantLimits:
    """Per-tenant limits; 0 means no limit."""

    rpm: int = 0
    tpm: int = 0
    max_concurrent: int = 0

    def __post_init__(self) -> None:
        for name in ("rpm", "tpm", "max_concurrent"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise GatewayError(Code.INVALID_REQUEST, "must be an integer >= 0", param=name)


@dataclass(frozen=True)
class KeyRecord:
    """One API key as ``chatq keys list`` shows it (never the key itself)."""

    key_id: str
    tenant: str
    created_ms: int


def check_tenant(name: str) -> str:
    if not isinstance(name, str) or not _TENANT_RE.fullmatch(name):
        raise GatewayError(
            Code.INVALID_REQUEST, "must be 1-64 of A-Z a-z 0-9 _ . -", param="tenant"
        )
    return name


def key_digest(api_key: str) -> str | None:
    """SHA-256 hex of a well-formed key; None for anything else (never a Redis lookup)."""
    if not _KEY_RE.fullmatch(api_key):
        return None
    return hashlib.sha256(api_key.encode()).hexdigest()


def new_webhook_secret() -> str:
    """A Standard Webhooks secret: ``whsec_`` + base64 of 32 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class TenantStore:
    """API keys and tenant records under one key prefix (a thin layer over redis.asyncio)."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys

    async def create_key(self, tenant: str, limits: TenantLimits | None = None) -> tuple[str, str]:
        """A new key for ``tenant`` (created if new); ``limits`` (if given) replace the
        tenant's. Returns (key, key id); the key is not stored and cannot be shown again."""
        check_tenant(tenant)
        key_id = secrets.token_hex(6)
        api_key = f"cq-{key_id}-{secrets.token_urlsafe(32)}"
        digest = key_digest(api_key)
        assert digest is not None
        now_ms = time.time_ns() // 1_000_000
        record = {"tenant": tenant, "digest": digest, "created_ms": now_ms}
        await self.ensure_tenant(tenant)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(self.keys.api_key(digest), mapping={"tenant": tenant, "key_id": key_id})
        pipe.hset(self.keys.api_keys, key_id, json.dumps(record))
        if limits is not None:
            pipe.hset(self.keys.tenant(tenant), mapping=_limit_fields(limits))
        await pipe.execute()
        return api_key, key_id

    async def ensure_tenant(self, tenant: str) -> None:
        """Create the tenant record (no limits, a fresh webhook secret) if it is missing."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.sadd(self.keys.tenants, tenant)
        pipe.hsetnx(self.keys.tenant(tenant), "webhook_secret", new_webhook_secret())
        pipe.hsetnx(self.keys.tenant(tenant), "created_ms", str(time.time_ns() // 1_000_000))
        await pipe.execute()

    async def set_limits(self, tenant: str, limits: TenantLimits) -> None:
        await self.ensure_tenant(check_tenant(tenant))
        await self.redis.hset(self.keys.tenant(tenant), mapping=_limit_fields(limits))  # type: ignore[misc]

    async def limits(self, tenant: str) -> TenantLimits:
        values = await self.redis.hmget(  # type: ignore[misc]
            self.keys.tenant(tenant), ["rpm", "tpm", "max_concurrent"]
        )
        rpm, tpm, conc = (int(v) if v is not None else 0 for v in values)
        return TenantLimits(rpm, tpm, conc)

    async def list_keys(self) -> list[KeyRecord]:
        raw: dict[Any, Any] = await self.redis.hgetall(self.keys.api_keys)  # type: ignore[misc]
        out: list[KeyRecord] = []
        for key_id, value in raw.items():
            record = json.loads(value)
            out.append(KeyRecord(_s(key_id), record["tenant"], int(record["created_ms"])))
        return sorted(out, key=lambda r: (r.tenant, r.created_ms))

    async def revoke(self, key_id: str) -> bool:
        """Delete a key by its id; False if there is no such key. Takes effect at once: the
        limits script checks the key's record on every request."""
        value = await self.redis.hget(self.keys.api_keys, key_id)  # type: ignore[misc]
        if value is None:
            return False
        digest = json.loads(value)["digest"]
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(self.keys.api_key(digest))
        pipe.hdel(self.keys.api_keys, key_id)
        await pipe.execute()
        return True

    async def has_keys(self) -> bool:
        return bool(await self.redis.hlen(self.keys.api_keys))  # type: ignore[misc]

    async def tenant_of(self, api_key: str) -> str | None:
        """The tenant a key belongs to, or None (malformed, unknown or revoked)."""
        digest = key_digest(api_key)
        if digest is None:
            return None
        value = await self.redis.hget(self.keys.api_key(digest), "tenant")  # type: ignore[misc]
        return None if value is None else _s(value)

    async def webhook_secret(self, tenant: str) -> str:
        """The tenant's signing secret (created on first use)."""
        key = self.keys.tenant(tenant)
        value = await self.redis.hget(key, "webhook_secret")  # type: ignore[misc]
        if value is None:
            await self.ensure_tenant(tenant)
            value = await self.redis.hget(key, "webhook_secret")  # type: ignore[misc]
        return _s(value)

    async def rotate_webhook_secret(self, tenant: str) -> str:
        await self.ensure_tenant(check_tenant(tenant))
        secret = new_webhook_secret()
        await self.redis.hset(self.keys.tenant(tenant), "webhook_secret", secret)  # type: ignore[misc]
        return secret


def _limit_fields(limits: TenantLimits) -> dict[str, int]:
    return {"rpm": limits.rpm, "tpm": limits.tpm, "max_concurrent": limits.max_concurrent}
