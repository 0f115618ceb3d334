"""``redis.asyncio`` clients whose commands are packed by hiredis (C) rather than in Python.

redis-py's sync client already packs commands with hiredis when it is installed; its asyncio
client (5.x) packs every argument in Python, ~1 µs each. chatq's batched calls carry
thousands of arguments (ENQUEUE of a ``submit_many``, FINALIZE of a worker's flush), so
packing was a visible share of a request's CPU. Same bytes on the wire; an argument hiredis
refuses (bool, None...) goes through redis-py's own packer, which raises its usual
``DataError``. Without hiredis the client is redis-py's, unchanged.
"""

from __future__ import annotations

from typing import Any, TypeVar

import redis.asyncio as aioredis

try:
    import hiredis

    _pack: Any = hiredis.pack_command
except (ImportError, AttributeError):  # hiredis missing, or too old to pack
    _pack = None

C = TypeVar("C", bound=type)


def hiredis_packing(connection_class: C) -> C:
    """A subclass of a ``redis.asyncio`` connection class that packs with hiredis."""
    if _pack is None or getattr(connection_class, "_chatq_hiredis_packing", False):
        return connection_class

    def pack_command(self: Any, *args: Any) -> list[bytes]:
        first = args[0]
        # as redis-py: a command name with spaces ("CONFIG GET") is several arguments
        if isinstance(first, str):
            if " " in first:
                args = tuple(first.encode().split()) + args[1:]
        elif isinstance(first, bytes) and b" " in first:
            args = tuple(first.split()) + args[1:]
        try:
            return [_pack(args)]
        except TypeError:
            packed: list[bytes] = connection_class.pack_command(self, *args)  # type: ignore[attr-defined]
            return packed

    name = f"Hiredis{connection_class.__name__}"
    attrs = {"pack_command": pack_command, "_chatq_hiredis_packing": True}
    return type(name, (connection_class,), attrs)  # type: ignore[return-value]


def connect(url: str, **kwargs: Any) -> aioredis.Redis:
    """``redis.asyncio.Redis.from_url(url, **kwargs)`` with hiredis packing (TLS and unix
    socket URLs keep their own connection classes, subclassed)."""
    client: aioredis.Redis = aioredis.Redis.from_url(url, **kwargs)
    pool = client.connection_pool
    pool.connection_class = hiredis_packing(pool.connection_class)
    return client
