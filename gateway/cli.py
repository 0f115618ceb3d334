"""``chatq gateway``, ``chatq keys ...`` and ``chatq webhooks`` (wired into ``workers.cli``).

chatq gateway [--redis URL] [--host H] [--port P] [--workers N] [--allow-anonymous]
chatq keys create --tenant NAME [--rpm N] [--tpm N] [--max-concurrent N]
chatq keys list | revoke KEY_ID | limits --tenant NAME [...] | secret --tenant NAME
chatq webhooks [--redis URL] [--webhook-allow-loopback] [--burst]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import sys
from typing import Any

from gateway.errors import ConfigError
from gateway.settings import GatewaySettings, WebhookSettings, add_arguments
from producer.settings import DEFAULT_REDIS_URL


def add_commands(sub: Any) -> None:
    """Add the gateway's subcommands to ``chatq``'s subparsers."""
    gw = sub.add_parser("gateway", help="the HTTP gateway (OpenAI API, job API)")
    add_arguments(gw, GatewaySettings)

    keys = sub.add_parser("keys", help="API keys and tenant limits of the gateway")
    keys.add_argument(
        "--redis",
        default=os.environ.get("CHATQ_REDIS_URL", DEFAULT_REDIS_URL),
        help=f"Redis URL (default $CHATQ_REDIS_URL or {DEFAULT_REDIS_URL})",
    )
    keys.add_argument(
        "--prefix",
        default=os.environ.get("CHATQ_PREFIX", "chatq"),
        help="Redis key prefix (default chatq)",
    )
    ksub = keys.add_subparsers(dest="keys_command", required=True)
    create = ksub.add_parser("create", help="a new key (printed once, on stdout)")
    limits = ksub.add_parser("limits", help="set a tenant's limits (0 = none)")
    for p in (create, limits):
        p.add_argument("--tenant", required=True, help="the key's tenant (created if new)")
        p.add_argument("--rpm", type=int, help="requests per minute (0 = no limit)")
        p.add_argument("--tpm", type=int, help="tokens per minute: prompt estimate + max_tokens")
        p.add_argument("--max-concurrent", type=int, help="requests in flight at once")
    lst = ksub.add_parser("list", help="keys (ids, tenants) and tenant limits")
    lst.add_argument("--json", action="store_true", help="one JSON object per key")
    revoke = ksub.add_parser("revoke", help="revoke a key by its id (at once)")
    revoke.add_argument("key_id", help="the key's id (chatq keys list)")
    secret = ksub.add_parser("secret", help="a tenant's webhook signing secret")
    secret.add_argument("--tenant", required=True, help="tenant name")
    secret.add_argument("--rotate", action="store_true", help="replace it with a new one")

    hooks = sub.add_parser("webhooks", help="deliver callbacks (an arq worker)")
    add_arguments(hooks, WebhookSettings)


# What the gateway's commands import beyond the producer (the `gateway` extra).
GATEWAY_EXTRA_MODULES = ("fastapi", "uvicorn", "orjson", "httpx", "arq")


def run(args: argparse.Namespace) -> int | None:
    """Run a gateway subcommand; None if ``args.command`` is not one."""
    if args.command not in ("gateway", "keys", "webhooks"):
        return None
    missing = [m for m in GATEWAY_EXTRA_MODULES if importlib.util.find_spec(m) is None]
    if missing and args.command != "keys":
        raise ConfigError(
            "extra",
            f"needs the gateway extra (missing: {', '.join(missing)}): "
            "pip install 'chatq[gateway]'",
        )
    if args.command == "gateway":
        return _gateway(GatewaySettings.from_args(args))
    if args.command == "keys":
        return asyncio.run(_keys(args))
    if args.command == "webhooks":
        return _webhooks(WebhookSettings.from_args(args))
    return None


def _gateway(settings: GatewaySettings) -> int:
    import uvicorn

    from gateway.service import check_startup

    asyncio.run(check_startup(settings))
    os.environ.update(settings.to_env())  # uvicorn's worker processes read their settings here
    uvicorn.run(
        "gateway.app:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        loop=_loop(),
        http="httptools",
        log_level=settings.log_level,
        access_log=settings.access_log,
        lifespan="on",
        timeout_graceful_shutdown=30,
    )
    return 0


def _loop() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def _webhooks(settings: WebhookSettings) -> int:
    from gateway.webhooks import build_worker

    worker = build_worker(settings)
    worker.run()
    return 0


async def _keys(args: argparse.Namespace) -> int:
    from gateway.tenants import TenantLimits, TenantStore
    from producer.connection import connect
    from producer.contract.keys import Keys

    redis = connect(args.redis)
    store = TenantStore(redis, Keys(args.prefix))
    try:
        cmd = args.keys_command
        if cmd in ("create", "limits"):
            given = {n: getattr(args, n) for n in ("rpm", "tpm", "max_concurrent")}
            limits = None
            if any(v is not None for v in given.values()) or cmd == "limits":
                current = await store.limits(args.tenant)
                limits = TenantLimits(
                    **{n: current.__dict__[n] if v is None else v for n, v in given.items()}
                )
            if cmd == "limits":
                assert limits is not None
                await store.set_limits(args.tenant, limits)
                print(f"tenant {args.tenant}: {_limits_text(limits)}", file=sys.stderr)
                return 0
            api_key, key_id = await store.create_key(args.tenant, limits)
            print(api_key)
            shown = await store.limits(args.tenant)
            print(
                f"key id {key_id}, tenant {args.tenant}: {_limits_text(shown)} "
                "(the key is shown only now)",
                file=sys.stderr,
            )
            return 0
        if cmd == "list":
            return await _list(store, args.json)
        if cmd == "revoke":
            if not await store.revoke(args.key_id):
                print(f"chatq keys revoke: no key {args.key_id}", file=sys.stderr)
                return 1
            return 0
        if cmd == "secret":
            value = await (
                store.rotate_webhook_secret(args.tenant)
                if args.rotate
                else store.webhook_secret(args.tenant)
            )
            print(value)
            return 0
        return 2
    finally:
        await redis.aclose()


async def _list(store: Any, as_json: bool) -> int:
    records = await store.list_keys()
    limits = {r.tenant: await store.limits(r.tenant) for r in records}
    if as_json:
        print(
            json.dumps(
                [
                    {
                        "key_id": r.key_id,
                        "tenant": r.tenant,
                        "created_ms": r.created_ms,
                        **limits[r.tenant].__dict__,
                    }
                    for r in records
                ]
            )
        )
        return 0
    if not records:
        print("no API keys")
    for r in records:
        print(f"{r.key_id}  {r.tenant}  {_limits_text(limits[r.tenant])}")
    return 0


def _limits_text(limits: Any) -> str:
    parts = [f"{name} {getattr(limits, name) or '-'}" for name in ("rpm", "tpm", "max_concurrent")]
    return ", ".join(parts)
