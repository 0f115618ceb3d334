"""hiredis-packed asyncio connections: the same bytes as redis-py's own packer, the same
errors, and real round trips (commands, pipelines, scripts) against the private Redis."""

from __future__ import annotations

from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection

from producer.connection import connect, hiredis_packing

pytest.importorskip("hiredis")

ARGS: list[tuple[Any, ...]] = [
    ("SET", "key", "value"),
    ("CONFIG GET", "maxmemory"),
    (b"CLIENT SETNAME", b"name"),
    ("XADD", "s", "*", "m", b"\x00\xff binary", "n", 12, "f", 0.30000000000000004),
    ("EVALSHA", "ab" * 20, 2, "k1", "k2", "é 東京 🙂", -7, 1e-9, memoryview(b"view")),
]


@pytest.mark.parametrize("args", ARGS)
def test_same_bytes_as_redis_py(args: tuple[Any, ...]) -> None:
    fast = hiredis_packing(Connection)()
    plain = Connection()
    assert b"".join(fast.pack_command(*args)) == b"".join(
        bytes(x) for x in plain.pack_command(*args)
    )
    batch = [args, ("GET", "key"), args]
    assert b"".join(fast.pack_commands(batch)) == b"".join(
        bytes(x) for x in plain.pack_commands(batch)
    )


@pytest.mark.parametrize("bad", [True, None, [1], {"a": 1}])
def test_refused_arguments_raise_redis_py_data_error(bad: Any) -> None:
    with pytest.raises(redis.DataError):
        hiredis_packing(Connection)().pack_command("SET", "key", bad)


def test_url_schemes_keep_their_connection_class() -> None:
    for url, base in [
        ("redis://localhost:6379/0", Connection),
        ("rediss://localhost:6379/0", SSLConnection),
        ("unix:///tmp/redis.sock", UnixDomainSocketConnection),
    ]:
        cls = connect(url).connection_pool.connection_class
        assert issubclass(cls, base) and cls is not base
        assert hiredis_packing(cls) is cls  # not wrapped twice


async def test_round_trips_against_real_redis(redis_url: str) -> None:
    client = connect(redis_url)
    try:
        await client.set("k", "é 東京")
        assert (await client.get("k")).decode() == "é 東京"
        pipe = client.pipeline(transaction=True)
        for i in range(300):
            pipe.rpush("list", i, b"\x00", 1.5)
        await pipe.execute()
        assert await client.llen("list") == 900
        script = client.register_script("return {#KEYS, ARGV[1], ARGV[#ARGV]}")
        keys = [f"k{i}" for i in range(1000)]
        assert await script(keys=keys, args=[b"first", *range(2000), "last"]) == [
            1000,
            b"first",
            b"last",
        ]
        assert await client.config_get("maxmemory") != {}  # "CONFIG GET": two arguments
    finally:
        await client.aclose()


async def test_plain_client_sees_the_same_data(redis_url: str) -> None:
    fast = connect(redis_url)
    plain = aioredis.Redis.from_url(redis_url)
    try:
        await fast.xadd("s", {"m": b"\x01\x02", "n": 3})
        ((_, fields),) = await plain.xrange("s")
        assert fields == {b"m": b"\x01\x02", b"n": b"3"}
    finally:
        await fast.aclose()
        await plain.aclose()
