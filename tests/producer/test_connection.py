"""hiredis-packed asyncio connections: the same bytes as redis-py's own packer, the same
errors, and real round trips (commands, pipelines, scripts) against the private Redis."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection

from producer import ChatClient, ChatqError, RedisUnavailable
from producer.connection import (
    ClusterUrl,
    SentinelUrl,
    check_url,
    connect,
    hiredis_packing,
    is_cluster,
)
from producer.contract.keys import Keys
from producer.settings import ClientSettings
from testkit.sentinel import SentinelGroup
from tests.workers.conftest import MODEL, ThreadWorker, tiny_settings
from workers.errors import ConfigError as WorkerConfigError
from workers.settings import WorkerSettings

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


# ---------------------------------------------------------------- Redis Sentinel


def test_cluster_urls_parse_with_defaults_and_credentials() -> None:
    url = "redis+cluster://app:p%40ss@10.0.0.1,10.0.0.2:7001"
    assert ClusterUrl.parse(url) == ClusterUrl(
        nodes=(("10.0.0.1", 6379), ("10.0.0.2", 7001)), username="app", password="p@ss"
    )
    assert is_cluster(connect("redis+cluster://127.0.0.1:1")) is True  # connects lazily
    assert is_cluster(connect("redis://127.0.0.1:1")) is False


def test_sentinel_urls_parse_with_defaults_and_credentials() -> None:
    url = "redis+sentinel://app:p%40ss@10.0.0.1,10.0.0.2:26380/chatq/3?sentinel_password=s"
    assert SentinelUrl.parse(url) == SentinelUrl(
        sentinels=(("10.0.0.1", 26379), ("10.0.0.2", 26380)), service="chatq", db=3,
        username="app", password="p@ss", sentinel_password="s",
    )  # fmt: skip
    assert SentinelUrl.parse("redis+sentinel://h/svc").db == 0


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis+sentinel://h1", "/service[/db] expected"),
        ("redis+sentinel://h1/svc/0/extra", "/service[/db] expected"),
        ("redis+sentinel://h1:0/svc", "bad Sentinel port '0'"),
        ("redis+sentinel://h1:x/svc", "bad Sentinel port 'x'"),
        ("redis+sentinel://h1,/svc", "empty Sentinel host"),
        ("redis+sentinel://h1/svc/one", "database must be a number"),
        ("redis+sentinel://h1/svc?ssl=1", "unsupported Sentinel URL option(s) ['ssl']"),
        ("http://h1/svc", "redis_url must be redis://, rediss://, unix://, redis+sentinel://"),
        ("redis+cluster://", "host[:port][,host[:port]...] expected"),
        ("redis+cluster://h1/0", "no database"),
        ("redis+cluster://h1?ssl=1", "no options"),
        ("redis+cluster://h1:99999", "bad Cluster port '99999'"),
        ("redis+cluster://h1,", "empty Cluster host"),
    ],
)
def test_bad_redis_urls_are_refused_naming_the_field(url: str, says: str) -> None:
    with pytest.raises(ChatqError, match="redis_url") as info:
        check_url(url)
    assert says in str(info.value)
    # every settings type refuses it with its own error, naming the field
    with pytest.raises(ChatqError, match="redis_url"):
        ClientSettings(redis_url=url)
    with pytest.raises(WorkerConfigError, match="redis_url"):
        WorkerSettings(model_path="/m", redis_url=url)


def test_a_client_and_a_worker_follow_a_sentinel_failover(
    tiny_checkpoint: Callable[..., Path],
) -> None:
    """A real master, replica and three Sentinels; the master is SIGKILLed between two chats.
    The worker and the client were given only the Sentinel URL: after the failover the
    second chat is queued on the promoted replica and answered by the same worker, which is
    still running (no restart by anyone). appendfsync always, and the first chat finished
    before the kill, so nothing the test relies on can be lost to asynchronous replication
    (what a failover can lose is measured in bench/sentinel_failover.py)."""
    with SentinelGroup(fsync="always") as group:
        settings = tiny_settings(group.url, tiny_checkpoint("llama"), name="sentinel-w")
        worker = ThreadWorker(settings).start()
        try:
            new_master = asyncio.run(_chat_across_a_failover(group))
        finally:
            worker.stop()
        assert worker.error is None, worker.error
        assert worker.exit_code == 0
        assert new_master != group.first_master


async def _chat_across_a_failover(group: SentinelGroup) -> int:
    messages = [{"role": "user", "content": "hello"}]
    async with ChatClient(group.url) as client:
        first = await client.chat(messages, model=MODEL, max_tokens=4, timeout_s=60)
        assert first.usage.completion_tokens >= 1
        old = group.kill_master()
        new = await asyncio.to_thread(group.wait_failover, old)
        assert new != old
        # The outage a caller sees: calls in flight on the dead master's connections fail
        # with RedisUnavailable until the pool reconnects through the Sentinels.
        second = None
        for _ in range(100):
            try:
                second = await client.chat(messages, model=MODEL, max_tokens=4, timeout_s=60)
                break
            except RedisUnavailable:
                await asyncio.sleep(0.1)
        assert second is not None and second.usage.completion_tokens >= 1
        # The server the client's pool now talks to names its own port.
        assert int((await client.redis.info("server"))["tcp_port"]) == new
        # the worker heartbeats on the promoted replica, through its own Sentinel client
        assert await client.redis.exists(Keys("chatq").heartbeat("sentinel-w"))
    return new
